//! The CSV reader on arbitrary bytes, with options taken from the first byte: it may refuse, never panic.
#![no_main]
use dptrain::data::{CsvOptions, HeaderMode, LabelColumn, csv::parse_csv};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (opts, body) = match data.split_first() {
        Some((&b, rest)) => (
            CsvOptions {
                label: if b & 0x80 != 0 {
                    LabelColumn::Name("y".into())
                } else {
                    LabelColumn::Index(usize::from(b & 0x03))
                },
                header: [HeaderMode::Auto, HeaderMode::Yes, HeaderMode::No]
                    [usize::from((b >> 2) & 0x03) % 3],
                delimiter: [None, Some(b','), Some(b'\t'), Some(b';')]
                    [usize::from((b >> 4) & 0x03)],
            },
            rest,
        ),
        None => (CsvOptions::default(), data),
    };
    if let Ok(ds) = parse_csv(body, "fuzz.csv", &opts) {
        assert_eq!(ds.y.len(), ds.n_samples);
        assert!(ds.n_features >= 1);
        let _ = ds.class_counts();
    }
});
