//! The CSV readers on arbitrary bytes, with options taken from the first two bytes: they may refuse,
//! never panic. Byte 0 picks the label column, header mode and delimiter; byte 1 picks the training
//! reader (`parse_csv`) or the predict reader (`parse_rows`: labelled or not, with or without an id column).
#![no_main]
use dptrain::data::{
    CsvOptions, Features, HeaderMode, LabelColumn,
    csv::{parse_csv, parse_rows},
};
use libfuzzer_sys::fuzz_target;

fn column(b: u8, name: &str) -> LabelColumn {
    // bits 0-1: an index 0..=3; bits 6-7: 0x or 10 index, 10 name, 11 last
    match b >> 6 {
        0 | 1 => LabelColumn::Index(usize::from(b & 0x03)),
        2 => LabelColumn::Name(name.into()),
        _ => LabelColumn::Last,
    }
}

fuzz_target!(|data: &[u8]| {
    let (opts, mode, body) = match data {
        [b, m, rest @ ..] => (
            CsvOptions {
                label: column(*b, "y"),
                header: [HeaderMode::Auto, HeaderMode::Yes, HeaderMode::No]
                    [usize::from((b >> 2) & 0x03) % 3],
                delimiter: [None, Some(b','), Some(b'\t'), Some(b';')]
                    [usize::from((b >> 4) & 0x03)],
            },
            *m,
            rest,
        ),
        _ => (CsvOptions::default(), 0, data),
    };
    if mode & 0x01 == 0 {
        if let Ok(ds) = parse_csv(body, "fuzz.csv", &opts) {
            assert_eq!(ds.y.len(), ds.n_samples);
            assert!(ds.n_features >= 1);
            assert_eq!(ds.x.len(), ds.n_samples * ds.n_features);
            let _ = ds.class_counts();
        }
        return;
    }
    // the predict path: bit 1 labelled; bits 2-3 no id column / id column from bits 4-7
    let labelled = mode & 0x02 != 0;
    let id = match (mode >> 2) & 0x03 {
        0 => None,
        _ => Some(column(mode & 0xf0 | (mode >> 4) & 0x03, "id")),
    };
    if let Ok(rows) = parse_rows(body, "fuzz.csv", &opts, labelled, id.as_ref()) {
        let ds = &rows.ds;
        assert_eq!(rows.labelled, labelled);
        assert_eq!(ds.y.len(), ds.n_samples);
        assert!(ds.n_samples >= 1);
        assert!(ds.n_features >= 1);
        assert!(matches!(ds.x, Features::F32(_)));
        assert_eq!(ds.x.len(), ds.n_samples * ds.n_features);
        assert_eq!(rows.ids.is_some(), id.is_some());
        if let Some(ids) = &rows.ids {
            assert_eq!(ids.len(), ds.n_samples);
        }
        if labelled {
            let _ = ds.class_counts();
        } else {
            assert!(ds.y.iter().all(|&v| v == 0.0));
            assert!(ds.labels.is_none());
        }
    }
});
