//! Fuzzes the config file parser, `config::parse`, on UTF-8 text (the agent reads the file as
//! a string, so other bytes never reach it).
//!
//! Properties: nothing panics; the same text parses to the same result twice (`parse` is
//! documented pure); a refused file yields at least one error, each with a position (1-based
//! line and column: `parse` never produces the line-0 "whole file" form, that is `load`'s) and
//! a non-empty message, and the errors come in file order.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nodetunnel::config::{parse, Overrides};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.yaml");
    let result = parse(path, text, &Overrides::default());
    assert_eq!(
        result,
        parse(path, text, &Overrides::default()),
        "parse is not deterministic"
    );
    let Err(errors) = result else {
        return;
    };
    assert!(!errors.0.is_empty(), "a refused config has no error");
    for error in &errors.0 {
        assert!(
            error.line >= 1 && error.column >= 1,
            "error without a position: {error:?}"
        );
        assert!(
            !error.message.is_empty(),
            "error without a message: {error:?}"
        );
        // Not checked yet: `field` is empty for an empty top-level key (`"": 1`), reported.
        assert_eq!(error.file, path);
    }
    let in_order = errors
        .0
        .windows(2)
        .all(|pair| (pair[0].line, pair[0].column) <= (pair[1].line, pair[1].column));
    assert!(in_order, "errors not in file order: {errors:?}");
    // What `check-config` prints.
    let _ = errors.to_string();
});
