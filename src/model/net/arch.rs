//! Model-definition files (`--arch net.toml`): a network as a list of layers with their settings,
//! read with one-line errors that name the layer and the key.
//!
//! ```toml
//! input = [1, 28, 28]          # optional: checked against the data's images
//! [[layer]]
//! type = "conv2d"              # conv2d: out, kernel, stride (1), padding (0), bias (true)
//! out = 6
//! kernel = 5
//! padding = 2
//! [[layer]]
//! type = "relu"                # relu, flatten, batch_norm2d, global_avg_pool
//! [[layer]]
//! type = "max_pool2d"          # max_pool2d, avg_pool2d: kernel, stride (= kernel), padding (0)
//! kernel = 2
//! [[layer]]
//! type = "residual"            # body + shortcut (identity when empty), then their sum
//! body = [{ type = "conv2d", out = 6, kernel = 3, padding = 1 }, { type = "relu" }]
//! [[layer]]
//! type = "flatten"
//! [[layer]]
//! type = "linear"              # linear: out (the last one may leave it out: the classes), bias, in
//! ```
//!
//! Layers are numbered as PyTorch's `nn.Sequential` numbers its modules (`0.weight`, ...); a
//! residual block `k` holds `k.body.i` and `k.shortcut.i`.

use serde::{Deserialize, Serialize};

use super::layers::conv2d::Conv2d;
use super::layers::linear::Linear;
use super::layers::pool::{Pool2d, PoolOp};
use super::{Builder, Net, Op, Shape, Src};

/// One layer of a definition file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LayerDef {
    Conv2d(Conv2d),
    MaxPool2d(Pool2d),
    AvgPool2d(Pool2d),
    GlobalAvgPool,
    BatchNorm2d,
    Linear(Linear),
    Relu,
    Flatten,
    Residual {
        body: Vec<LayerDef>,
        #[serde(default)]
        shortcut: Vec<LayerDef>,
    },
}

/// A whole definition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Arch {
    /// The input the network is meant for, when the file states it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<[usize; 3]>,
    #[serde(rename = "layer")]
    pub layers: Vec<LayerDef>,
}

const TYPES: &str = "conv2d, max_pool2d, avg_pool2d, global_avg_pool, batch_norm2d, linear, relu, flatten, residual";

/// The error message's first line, without toml's source excerpt.
fn one_line(e: impl std::fmt::Display) -> String {
    let s = e.to_string();
    let mut lines = s.lines().filter(|l| {
        let t = l.trim_start();
        !(t.is_empty() || t.starts_with('|') || t.starts_with("-->") || t.starts_with('^'))
    });
    let first = lines.next().unwrap_or("").trim().to_string();
    // toml puts the reason after the excerpt; keep the last meaningful line when the first is
    // only a position
    match lines.next_back() {
        Some(l) if first.starts_with("TOML parse error") => l.trim().to_string(),
        _ => first,
    }
}

fn parse_layer(v: toml::Value, at: &str) -> Result<LayerDef, String> {
    let kind = v
        .get("type")
        .and_then(|t| t.as_str())
        .map(String::from)
        .ok_or_else(|| format!("layer {at}: no type (one of {TYPES})"))?;
    if let (Some(t), Some(body)) = (v.as_table(), v.get("body"))
        && kind == "residual"
    {
        let inner = |key: &str, list: Option<&toml::Value>| -> Result<Vec<LayerDef>, String> {
            match list {
                None => Ok(Vec::new()),
                Some(toml::Value::Array(a)) => a
                    .iter()
                    .enumerate()
                    .map(|(i, l)| parse_layer(l.clone(), &format!("{at}.{key}.{i}")))
                    .collect(),
                Some(_) => Err(format!(
                    "layer {at} (residual): {key} must be a list of layers"
                )),
            }
        };
        if let Some(k) = t
            .keys()
            .find(|k| !["type", "body", "shortcut"].contains(&k.as_str()))
        {
            return Err(format!(
                "layer {at} (residual): unknown key `{k}` (body, shortcut)"
            ));
        }
        return Ok(LayerDef::Residual {
            body: inner("body", Some(body))?,
            shortcut: inner("shortcut", t.get("shortcut"))?,
        });
    }
    LayerDef::deserialize(v).map_err(|e| {
        let msg = one_line(e);
        if msg.starts_with("unknown variant") {
            format!("layer {at}: unknown type \"{kind}\" (one of {TYPES})")
        } else {
            format!("layer {at} ({kind}): {msg}")
        }
    })
}

impl Arch {
    /// Read a definition from TOML text; errors are one line naming the layer and the key.
    pub fn parse(text: &str) -> Result<Self, String> {
        let doc: toml::Table = toml::from_str(text).map_err(one_line)?;
        if let Some(k) = doc
            .keys()
            .find(|k| !["input", "layer"].contains(&k.as_str()))
        {
            return Err(format!("unknown key `{k}` (input, layer)"));
        }
        let input = match doc.get("input") {
            None => None,
            Some(v) => Some(
                <[usize; 3]>::deserialize(v.clone())
                    .map_err(|_| "input must be [channels, height, width]".to_string())?,
            ),
        };
        let layers = match doc.get("layer") {
            Some(toml::Value::Array(a)) if !a.is_empty() => a
                .iter()
                .enumerate()
                .map(|(i, v)| parse_layer(v.clone(), &i.to_string()))
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err("no [[layer]] entries".into()),
        };
        Ok(Self { input, layers })
    }

    /// The network for `input` images and `classes` outputs.
    pub fn build(&self, input: Shape, classes: usize) -> Result<Net, String> {
        if let Some([c, h, w]) = self.input {
            let want = Shape::image(c, h, w);
            if want != input {
                return Err(format!(
                    "the definition's input is {want}, and the data holds {input}"
                ));
            }
        }
        if self.layers.is_empty() {
            return Err("the definition has no layers".into());
        }
        let mut b = Builder::new(input);
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            add(&mut b, l, &i.to_string(), (i == last).then_some(classes))?;
        }
        let out = b.shape(b.last());
        if out != Shape::rows(classes) {
            return Err(format!(
                "the last layer gives {out} values per sample, and the data has {classes} classes (end with a linear layer)"
            ));
        }
        b.finish()
    }
}

/// Add layer `l` (named `name`) after the builder's last node; `classes` fills the last linear
/// layer's `out` when the file leaves it out.
fn add(b: &mut Builder, l: &LayerDef, name: &str, classes: Option<usize>) -> Result<Src, String> {
    let op = match l {
        LayerDef::Conv2d(c) => Op::Conv2d(*c),
        LayerDef::MaxPool2d(p) => Op::Pool(PoolOp::Max(*p)),
        LayerDef::AvgPool2d(p) => Op::Pool(PoolOp::Avg(*p)),
        LayerDef::GlobalAvgPool => Op::Pool(PoolOp::Global),
        LayerDef::BatchNorm2d => Op::BatchNorm2d,
        LayerDef::Linear(lin) => {
            let mut lin = *lin;
            if lin.out == 0
                && let Some(k) = classes
            {
                lin.out = k;
            }
            Op::Linear(lin)
        }
        LayerDef::Relu => Op::Relu,
        LayerDef::Flatten => Op::Flatten,
        LayerDef::Residual { body, shortcut } => {
            let x = b.last();
            let mut main = x;
            for (i, l) in body.iter().enumerate() {
                main = add(b, l, &format!("{name}.body.{i}"), None)?;
            }
            let mut skip = x;
            for (i, l) in shortcut.iter().enumerate() {
                // the shortcut reads the block's input, not the body's output
                skip = if i == 0 {
                    add_from(b, l, &format!("{name}.shortcut.{i}"), x)?
                } else {
                    add(b, l, &format!("{name}.shortcut.{i}"), None)?
                };
            }
            return b.add(&format!("{name}.add"), Op::Add, &[main, skip]);
        }
    };
    b.then(name, op)
}

/// As [`add`] for a plain layer, reading `from` instead of the last node.
fn add_from(b: &mut Builder, l: &LayerDef, name: &str, from: Src) -> Result<Src, String> {
    if let LayerDef::Residual { .. } = l {
        return Err(format!("layer {name}: a residual block inside a shortcut"));
    }
    // build the op as `add` would, then wire it to `from`
    let mut probe = Builder::new(b.shape(from));
    add(&mut probe, l, name, None)?;
    let op = probe
        .first_op()
        .ok_or_else(|| format!("layer {name}: nothing to add"))?;
    b.add(name, op, &[from])
}

#[cfg(test)]
mod tests {
    use super::*;

    const LENET: &str = r#"
input = [1, 28, 28]
[[layer]]
type = "conv2d"
out = 6
kernel = 5
padding = 2
[[layer]]
type = "relu"
[[layer]]
type = "max_pool2d"
kernel = 2
[[layer]]
type = "residual"
body = [{ type = "conv2d", out = 6, kernel = 3, padding = 1 }, { type = "batch_norm2d" }]
[[layer]]
type = "relu"
[[layer]]
type = "flatten"
[[layer]]
type = "linear"
"#;

    #[test]
    fn a_definition_builds_with_pytorch_style_names() {
        let a = Arch::parse(LENET).unwrap();
        let net = a.build(Shape::image(1, 28, 28), 10).unwrap();
        let names: Vec<&str> = net.layout.tensors.iter().map(|t| t.name.as_str()).collect();
        assert!(names.contains(&"3.body.0.weight"), "{names:?}");
        assert!(names.contains(&"3.body.1.running_var"), "{names:?}");
        assert!(names.contains(&"6.weight"), "{names:?}");
        assert_eq!(net.nodes.last().unwrap().out, Shape::rows(10));
        // serialised (as model files keep it) and read back, the same network
        let json = serde_json::to_string(&a).unwrap();
        let back: Arch = serde_json::from_str(&json).unwrap();
        assert_eq!(back.build(Shape::image(1, 28, 28), 10).unwrap(), net);
    }

    #[test]
    fn errors_name_the_layer_and_the_key_on_one_line() {
        let bad = LENET.replace("kernel = 5", "kernal = 5");
        let e = Arch::parse(&bad).unwrap_err();
        assert!(
            e.starts_with("layer 0 (conv2d): unknown field `kernal`"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        let e = Arch::parse(&LENET.replace("\"max_pool2d\"", "\"maxpool\"")).unwrap_err();
        assert!(e.starts_with("layer 2: unknown type \"maxpool\""), "{e}");
        let e = Arch::parse(&LENET.replace("out = 6, kernel = 3, ", "out = 6, ")).unwrap_err();
        assert_eq!(e, "layer 3.body.0 (conv2d): missing field `kernel`");
        let e = Arch::parse(&LENET.replace("padding = 2\n", "padding = \"two\"\n")).unwrap_err();
        assert!(e.starts_with("layer 0 (conv2d): invalid type"), "{e}");
        let a = Arch::parse(LENET).unwrap();
        let e = a.build(Shape::image(3, 32, 32), 10).unwrap_err();
        assert_eq!(
            e,
            "the definition's input is 1×28×28, and the data holds 3×32×32"
        );
        let flat = LENET.replace("[[layer]]\ntype = \"flatten\"\n", "");
        let e = Arch::parse(&flat)
            .unwrap()
            .build(Shape::image(1, 28, 28), 10)
            .unwrap_err();
        assert!(e.starts_with("layer 5 (linear): takes rows"), "{e}");
        let sized = LENET.replace("type = \"linear\"\n", "type = \"linear\"\nin = 100\n");
        let e = Arch::parse(&sized)
            .unwrap()
            .build(Shape::image(1, 28, 28), 10)
            .unwrap_err();
        assert_eq!(
            e,
            "layer 6 (linear): in = 100, but its input has 1176 features"
        );
    }
}
