//! `train --config FILE.toml` and the settings file a run writes: [`expand_config`] turns the
//! file's keys into flags placed before the command line's own, each checked against `train`'s
//! flags; [`settings_toml`] writes a run's resolved flags back in that form.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::Cli;

/// `train --config FILE.toml`: the file's keys become flags placed before the command line's own,
/// so that the command line overrides them (every train flag overrides an earlier use of itself).
/// Keys are flag names (`lr`, `batch-size` or `batch_size`); arrays join with commas; `true`
/// gives a switch, `false` leaves it off.
pub fn expand_config(args: Vec<std::ffi::OsString>) -> anyhow::Result<Vec<std::ffi::OsString>> {
    let Some(sub) = args.iter().position(|a| a == "train") else {
        return Ok(args);
    };
    let mut path = None;
    for (i, a) in args.iter().enumerate().skip(sub + 1) {
        let s = a.to_string_lossy();
        if s == "--config" {
            path = args.get(i + 1).map(PathBuf::from);
        } else if let Some(p) = s.strip_prefix("--config=") {
            path = Some(PathBuf::from(p));
        }
    }
    let Some(path) = path else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("--config {}: cannot read", path.display()))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        anyhow::anyhow!("--config {}: {}", path.display(), e.message())
    })?;
    let mut flags: Vec<std::ffi::OsString> = Vec::new();
    let cli = {
        use clap::CommandFactory;
        Cli::command()
    };
    let train = cli
        .find_subcommand("train")
        .ok_or_else(|| anyhow::anyhow!("no train command"))?;
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        check_config_entry(train, &path, &key, &value)?;
        let scalar = |v: &toml::Value| -> anyhow::Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                other => bail!(
                    "--config {}: {key} = {other}: expected a string, a number or a list of them",
                    path.display()
                ),
            })
        };
        match &value {
            toml::Value::Boolean(true) => flags.push(flag.into()),
            toml::Value::Boolean(false) => {}
            // an empty list is the flag's default (no values)
            toml::Value::Array(items) if items.is_empty() => {}
            toml::Value::Array(items) => {
                let parts = items
                    .iter()
                    .map(scalar)
                    .collect::<anyhow::Result<Vec<_>>>()?;
                flags.push(format!("{flag}={}", parts.join(",")).into());
            }
            v => flags.push(format!("{flag}={}", scalar(v)?).into()),
        }
    }
    let mut out: Vec<std::ffi::OsString> = args[..=sub].to_vec();
    out.extend(flags);
    out.extend(args[sub + 1..].iter().cloned());
    Ok(out)
}

/// One `--config` entry checked against `train`'s flags, so that a mistake is one line naming the
/// file and the key rather than a command-line error for a flag nobody typed.
fn check_config_entry(
    train: &clap::Command,
    path: &Path,
    key: &str,
    value: &toml::Value,
) -> anyhow::Result<()> {
    let name = key.replace('_', "-");
    let file = path.display();
    if name == "config" {
        bail!("--config {file}: {key}: a config file cannot name another");
    }
    let Some(arg) = train
        .get_arguments()
        .find(|a| a.get_long() == Some(name.as_str()))
    else {
        let near = train
            .get_arguments()
            .filter_map(|a| a.get_long())
            .map(|l| (edit_distance(&name, l), l))
            .min()
            .filter(|(d, _)| *d <= 3)
            .map(|(_, l)| format!(" (did you mean {l}?)"))
            .unwrap_or_default();
        bail!("--config {file}: {key} is not a train flag{near}");
    };
    let switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
    match (value, switch) {
        (toml::Value::Boolean(_), true) => return Ok(()),
        (_, true) => bail!("--config {file}: {key} = {value}: expected true or false"),
        (toml::Value::Boolean(_), false) => {
            bail!("--config {file}: {key} = {value}: expected a value, not true or false")
        }
        _ => {}
    }
    let text = match value {
        toml::Value::Array(items) if items.is_empty() => return Ok(()),
        toml::Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(","),
        toml::Value::String(t) => t.clone(),
        v => v.to_string(),
    };
    // the value through train's own parser, alone (with a stand-in for the required --data)
    let mut line = vec!["train".to_string()];
    if name != "data" {
        line.push("--data=-".into());
    }
    line.push(format!("--{name}={text}"));
    if let Err(e) = train.clone().try_get_matches_from(line) {
        let msg = e.to_string();
        let first = msg.lines().next().unwrap_or_default();
        bail!(
            "--config {file}: {key} = {value}: {}",
            first.trim_start_matches("error: ")
        );
    }
    Ok(())
}

/// Levenshtein distance, for suggesting a flag.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Flags that name a run's outputs: written into its settings file as comments, so that the file
/// reruns the same training without writing over the first run's files.
const OUTPUT_KEYS: [&str; 5] = [
    "save",
    "save-best",
    "metrics-out",
    "tensorboard",
    "checkpoint-dir",
];

/// The resolved settings of a run (its `TrainArgs`) as TOML, usable again as `--config` (outputs
/// as comments).
pub fn settings_toml(a: &impl serde::Serialize) -> anyhow::Result<String> {
    let mut table = toml::Table::try_from(a)?;
    // an --arch file is the model: `model` beside it would conflict when the file is rerun
    if table.contains_key("arch") {
        table.remove("model");
    }
    let outputs: Vec<(String, toml::Value)> = OUTPUT_KEYS
        .iter()
        .filter_map(|k| table.remove(*k).map(|v| (k.to_string(), v)))
        .collect();
    let mut text =
        String::from("# dptrain train settings: rerun with `dptrain train --config THIS_FILE`\n");
    text += &toml::to_string(&table)?;
    if !outputs.is_empty() {
        text +=
            "\n# the outputs of the run that wrote this file (choose your own when rerunning):\n";
        for (k, v) in outputs {
            text += &format!("# {k} = {v}\n");
        }
    }
    Ok(text)
}
