//! Stable fuzzing of the request decoder, bounded in time: `AIRLOCK_FUZZ_SECS` (default 5) per
//! seed, seeds from `AIRLOCK_FUZZ_SEED` (default: three fixed ones, so CI runs reproduce).
//! `cargo fuzz` (fuzz/, nightly only) drives the same `protocol::decode_request`.

use std::time::Duration;

#[test]
fn decoder_survives_generated_and_mutated_requests() {
    let secs: u64 = std::env::var("AIRLOCK_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let seeds: Vec<u64> = match std::env::var("AIRLOCK_FUZZ_SEED") {
        Ok(s) => vec![s.parse().expect("AIRLOCK_FUZZ_SEED is a number")],
        Err(_) => vec![1, 0xA1F0C4, 20240601],
    };
    for seed in seeds {
        let budget = Duration::from_secs(secs) / 3;
        let report = airlock_agent::fuzz::run(seed, budget, u64::MAX);
        println!(
            "fuzz seed {seed}: {} inputs in {budget:?}, {} accepted, {} rejected",
            report.iterations, report.accepted, report.rejected
        );
        assert!(report.iterations > 1000, "too few inputs tried: {report:?}");
        assert!(report.accepted > 0 && report.rejected > 0, "{report:?}");
    }
}
