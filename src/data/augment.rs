//! Image augmentation for training batches (`--augment crop:4,flip`): a random crop of the image
//! padded by P pixels on each side, and a horizontal flip with probability ½, as torchvision's
//! `RandomCrop(32, padding=4)` and `RandomHorizontalFlip()` do for CIFAR.
//!
//! Each draw is a hash of (seed, optimiser step, global sample number), like dropout's masks: the
//! same on any number of ranks, and a resumed run draws what the uninterrupted one drew, with no
//! state to save. The padding is zero after normalisation (black for pixel data, scaled to [0, 1]).

use std::fmt;

/// What `--augment` asks for (written as it is spelled on the command line: `crop:4,flip`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Augment {
    /// Padding of the random crop (0: no crop).
    pub crop: usize,
    pub flip: bool,
}

impl Augment {
    /// Parse `crop:P`, `flip`, or both separated by a comma.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut a = Self::default();
        for part in s.split(',').map(str::trim) {
            match part.split_once(':') {
                Some(("crop", p)) => {
                    a.crop = p
                        .parse()
                        .ok()
                        .filter(|&v: &usize| (1..=64).contains(&v))
                        .ok_or_else(|| {
                            format!("crop:{p}: the padding must be a whole number from 1 to 64")
                        })?;
                }
                None if part == "flip" => a.flip = true,
                _ => {
                    return Err(format!(
                        "unknown augmentation {part:?} (crop:P, flip, or both: crop:4,flip)"
                    ));
                }
            }
        }
        Ok(a)
    }

    pub fn is_none(&self) -> bool {
        self.crop == 0 && !self.flip
    }

    /// The draw for one sample at one step: (row shift, column shift, flip), shifts in
    /// −crop..=crop.
    pub fn draw(&self, seed: u64, step: u64, sample: u32) -> (isize, isize, bool) {
        let mut h = mix(0xA46_3E47, seed as u32);
        for v in [
            (seed >> 32) as u32,
            step as u32,
            (step >> 32) as u32,
            sample,
        ] {
            h = mix(h, v);
        }
        let span = 2 * self.crop as u32 + 1;
        let dy = (h % span) as isize - self.crop as isize;
        let h2 = mix(h, 1);
        let dx = (h2 % span) as isize - self.crop as isize;
        let flip = self.flip && mix(h2, 2) & 1 == 1;
        (dy, dx, flip)
    }

    /// Apply the draw of (seed, step, sample) to one C×H×W image in place.
    pub fn apply(&self, image: [usize; 3], row: &mut [f32], seed: u64, step: u64, sample: u32) {
        let (dy, dx, flip) = self.draw(seed, step, sample);
        let [c, h, w] = image;
        let src = row.to_vec();
        for ch in 0..c {
            let plane = &src[ch * h * w..(ch + 1) * h * w];
            for y in 0..h {
                for x in 0..w {
                    // output pixel (y, x) reads input (y + dy, x' + dx), x' mirrored when flipping
                    let xs = if flip { w - 1 - x } else { x };
                    let (sy, sx) = (y as isize + dy, xs as isize + dx);
                    let v = if (0..h as isize).contains(&sy) && (0..w as isize).contains(&sx) {
                        plane[sy as usize * w + sx as usize]
                    } else {
                        0.0
                    };
                    row[(ch * h + y) * w + x] = v;
                }
            }
        }
    }
}

impl fmt::Display for Augment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if self.crop > 0 {
            parts.push(format!("crop:{}", self.crop));
        }
        if self.flip {
            parts.push("flip".to_string());
        }
        write!(f, "{}", parts.join(","))
    }
}

impl serde::Serialize for Augment {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

fn mix(h: u32, v: u32) -> u32 {
    let mut x = h ^ v.wrapping_mul(0x9e37_79b9);
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_crop_and_flip_and_names_the_rest() {
        assert_eq!(
            Augment::parse("crop:4,flip").unwrap(),
            Augment {
                crop: 4,
                flip: true
            }
        );
        assert!(Augment::parse("flip").unwrap().crop == 0);
        let a = Augment::parse("crop:4,flip").unwrap();
        assert_eq!(Augment::parse(&a.to_string()).unwrap(), a);
        assert!(
            Augment::parse("crop:0")
                .unwrap_err()
                .contains("from 1 to 64")
        );
        assert!(
            Augment::parse("rotate")
                .unwrap_err()
                .contains("unknown augmentation")
        );
    }

    #[test]
    fn draws_are_deterministic_spread_and_shift_the_image() {
        let a = Augment {
            crop: 2,
            flip: true,
        };
        assert_eq!(a.draw(1, 5, 9), a.draw(1, 5, 9));
        let draws: Vec<_> = (0..2000).map(|s| a.draw(3, 1, s)).collect();
        for d in -2..=2 {
            assert!(draws.iter().any(|t| t.0 == d) && draws.iter().any(|t| t.1 == d));
        }
        let flips = draws.iter().filter(|t| t.2).count();
        assert!((800..1200).contains(&flips), "{flips} flips in 2000");
        // a 1×3×3 image shifted and flipped as drawn
        let img: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let s = (0..).find(|&s| a.draw(0, 0, s) == (1, 0, true)).unwrap();
        let mut row = img.clone();
        a.apply([1, 3, 3], &mut row, 0, 0, s);
        // rows move up by one (row 1 of the input is row 0 of the output), columns mirrored
        assert_eq!(row, vec![6.0, 5.0, 4.0, 9.0, 8.0, 7.0, 0.0, 0.0, 0.0]);
    }
}
