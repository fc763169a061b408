//! The IDX reader (gzip or raw) on arbitrary bytes, as images and as labels: never a panic, never a
//! huge allocation from a lying header.
#![no_main]
use dptrain::data::idx::parse_idx;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for images in [true, false] {
        if let Ok((dims, bytes)) = parse_idx(data, "fuzz-idx", images) {
            let n: u64 = dims.iter().map(|&d| u64::from(d)).product();
            assert_eq!(n, bytes.len() as u64);
        }
    }
});
