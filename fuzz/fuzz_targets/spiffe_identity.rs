//! Fuzzes SPIFFE identity parsing, `Identity::from_str`, on UTF-8 text (certificate SANs,
//! config and policy principals all arrive as strings).
//!
//! Properties: nothing panics; an accepted identity displays as exactly the input (no
//! normalisation: policy and pool keys compare bytes) and equals the identity built from its
//! parts; a refused one has an error that renders.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodetunnel::spiffe::Identity;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<Identity>() {
        Ok(identity) => {
            assert_eq!(identity.to_string(), text, "display round trip");
            let rebuilt = Identity::new(
                identity.trust_domain(),
                identity.namespace(),
                identity.service_account(),
            );
            assert_eq!(rebuilt.as_ref(), Ok(&identity), "parts round trip");
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
});
