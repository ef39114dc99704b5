//! `Config` from a TOML document plus `SWITCHBOARD_*` overrides: a typed error or a config
//! that validates and survives its own `--print-config` round trip.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use switchboard::Config;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    toml: &'a str,
    env: Vec<(&'a str, &'a str)>,
}

fuzz_target!(|input: Input<'_>| {
    // `*_file` keys read the file they name (an operator's choice, not a stranger's input);
    // keep the fuzzer off the machine's files.
    let touches_files = |s: &str| s.to_ascii_lowercase().contains("file");
    if touches_files(input.toml)
        || input
            .env
            .iter()
            .any(|(k, v)| touches_files(k) || touches_files(v))
    {
        return;
    }
    let env = input
        .env
        .iter()
        .map(|(k, v)| (format!("SWITCHBOARD_{k}"), v.to_string()));
    if let Ok(cfg) = Config::from_toml_with_env(input.toml, env) {
        cfg.validate().expect("a loaded config validates");
        let again = Config::from_toml(&cfg.to_toml());
        if let Ok(again) = again {
            assert_eq!(again.to_toml(), cfg.to_toml(), "print-config round trip");
        }
    }
});
