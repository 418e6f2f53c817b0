#![no_main]
//! Input layout: method index (1 byte), target length (2 bytes, LE), target, body.

use libfuzzer_sys::fuzz_target;

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH"];

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let method = METHODS[data[0] as usize % METHODS.len()];
    let len = u16::from_le_bytes([data[1], data[2]]) as usize;
    let rest = &data[3..];
    let (target, body) = rest.split_at(len.min(rest.len()));
    let target = String::from_utf8_lossy(target);
    if let Ok(request) = airlock_agent::protocol::decode_request(method, &target, body) {
        airlock_agent::fuzz::check_invariants(&request);
    }
});
