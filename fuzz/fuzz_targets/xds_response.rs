//! Any bytes as a delta xDS response from istiod: decoding and applying it must never panic,
//! and whatever is refused must leave the model exactly as it was for those resources.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodetunnel::proto::discovery::DeltaDiscoveryResponse;
use nodetunnel::xds::{Versions, XdsModel};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(mut response) = DeltaDiscoveryResponse::decode(data) else {
        return;
    };
    // Steer half the inputs at the subscribed types so conversion is reached.
    if data.first().is_some_and(|byte| byte & 1 == 0) {
        response.type_url = nodetunnel::proto::ADDRESS_TYPE.to_string();
    } else if data.first().is_some_and(|byte| byte & 2 == 0) {
        response.type_url = nodetunnel::proto::AUTHORIZATION_TYPE.to_string();
    }
    let mut model = XdsModel::default();
    let mut versions = Versions::default();
    if let Ok(applied) = model.apply(&response, &mut versions) {
        let _ = applied.nack_message();
        // Starting from nothing, a name refused in its only occurrence must not be anywhere.
        for rejected in &applied.rejected {
            let occurrences = response
                .resources
                .iter()
                .filter(|resource| resource.name == rejected.name)
                .count();
            if occurrences == 1 {
                assert!(!model.workloads.contains_key(&rejected.name));
                assert!(!model.services.contains_key(&rejected.name));
                assert!(!model.policies.contains_key(&rejected.name));
            }
        }
    }
});
