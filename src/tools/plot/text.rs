//! PNG text: a TrueType font of the system when one is found, else a built-in 8×8 bitmap font,
//! drawn through a backend wrapper so that no plotters font feature (and no fontconfig) is needed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, anyhow};
use plotters::prelude::*;
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{BackendColor, BackendCoord, BackendTextStyle, DrawingErrorKind};

// ---- PNG text ----

/// How PNG text is rasterised: a TrueType font, or the built-in 8×8 bitmap font.
#[derive(Clone)]
pub(super) enum Glyphs {
    Outline(ab_glyph::FontArc),
    Bitmap,
}

/// Where a sans-serif TrueType font usually is (Debian/Ubuntu, Fedora, Arch, macOS, Windows).
pub(super) const FONT_PATHS: [&str; 12] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/usr/share/fonts/gnu-free/FreeSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

impl Glyphs {
    /// `DPTRAIN_PLOT_FONT` when set (an error if it is not a usable font), else the first
    /// usable font of [`FONT_PATHS`], else the bitmap font. Looked up once per process.
    pub(super) fn system() -> anyhow::Result<Glyphs> {
        if let Some(p) = std::env::var_os("DPTRAIN_PLOT_FONT").filter(|p| !p.is_empty()) {
            let p = PathBuf::from(p);
            return load_font(&p)
                .map(Glyphs::Outline)
                .with_context(|| format!("DPTRAIN_PLOT_FONT={}", p.display()));
        }
        static FOUND: OnceLock<Option<ab_glyph::FontArc>> = OnceLock::new();
        let found =
            FOUND.get_or_init(|| FONT_PATHS.iter().find_map(|p| load_font(Path::new(p)).ok()));
        Ok(found.clone().map_or(Glyphs::Bitmap, Glyphs::Outline))
    }

    /// The bitmap font's scale: whole multiples of 8 pixels.
    pub(super) fn bitmap_scale(size: f64) -> i32 {
        ((size / 8.0).round() as i32).max(1)
    }

    /// Width and height of `text` at `size` pixels.
    pub(super) fn size(&self, text: &str, size: f64) -> (i32, i32) {
        match self {
            Glyphs::Outline(font) => {
                use ab_glyph::{Font, ScaleFont};
                let sf = font.as_scaled(size as f32);
                let mut w = 0.0f32;
                let mut prev = None;
                for c in text.chars() {
                    let id = sf.glyph_id(c);
                    if let Some(p) = prev {
                        w += sf.kern(p, id);
                    }
                    w += sf.h_advance(id);
                    prev = Some(id);
                }
                (w.ceil() as i32, (sf.ascent() - sf.descent()).ceil() as i32)
            }
            Glyphs::Bitmap => {
                let k = Self::bitmap_scale(size);
                (8 * k * text.chars().count() as i32, 8 * k)
            }
        }
    }

    /// Rasterises `text` at `size` pixels with its box's top-left corner at (0, 0): `put(x, y,
    /// coverage)` for each touched pixel.
    pub(super) fn render(&self, text: &str, size: f64, mut put: impl FnMut(i32, i32, f32)) {
        match self {
            Glyphs::Outline(font) => {
                use ab_glyph::{Font, ScaleFont, point};
                let sf = font.as_scaled(size as f32);
                let mut x = 0.0f32;
                let mut prev = None;
                for c in text.chars() {
                    let id = sf.glyph_id(c);
                    if let Some(p) = prev {
                        x += sf.kern(p, id);
                    }
                    let glyph = id.with_scale_and_position(sf.scale(), point(x, sf.ascent()));
                    if let Some(outline) = font.outline_glyph(glyph) {
                        let b = outline.px_bounds();
                        let (bx, by) = (b.min.x as i32, b.min.y as i32);
                        outline.draw(|gx, gy, cov| put(bx + gx as i32, by + gy as i32, cov));
                    }
                    x += sf.h_advance(id);
                    prev = Some(id);
                }
            }
            Glyphs::Bitmap => {
                let k = Self::bitmap_scale(size);
                for (i, c) in text.chars().enumerate() {
                    let code = if c.is_ascii() && !c.is_ascii_control() {
                        c as usize
                    } else {
                        b'?' as usize
                    };
                    let rows = font8x8::legacy::BASIC_LEGACY[code];
                    let x0 = 8 * k * i as i32;
                    for (r, bits) in rows.iter().enumerate() {
                        for b in 0..8 {
                            if bits >> b & 1 == 1 {
                                for dy in 0..k {
                                    for dx in 0..k {
                                        put(x0 + b * k + dx, r as i32 * k + dy, 1.0);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

pub(super) fn load_font(path: &Path) -> anyhow::Result<ab_glyph::FontArc> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    ab_glyph::FontArc::try_from_vec(bytes)
        .map_err(|e| anyhow!("{}: not a usable font: {e}", path.display()))
}

/// A drawing backend that draws everything through `inner` but rasterises text itself with
/// [`Glyphs`], so that no plotters font feature (and no fontconfig) is needed.
pub(super) struct TextBackend<B> {
    pub(super) inner: B,
    pub(super) glyphs: Glyphs,
}

impl<B: DrawingBackend> DrawingBackend for TextBackend<B> {
    type ErrorType = B::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }
    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.ensure_prepared()
    }
    fn present(&mut self) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.present()
    }
    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_pixel(point, color)
    }
    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_line(from, to, style)
    }
    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }
    fn draw_path<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_path(path, style)
    }
    fn draw_circle<S: plotters_backend::BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.draw_circle(center, radius, style, fill)
    }
    fn fill_polygon<S: plotters_backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.fill_polygon(vert, style)
    }
    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        self.inner.blit_bitmap(pos, size, src)
    }

    fn estimate_text_size<TStyle: BackendTextStyle>(
        &self,
        text: &str,
        style: &TStyle,
    ) -> Result<(u32, u32), DrawingErrorKind<B::ErrorType>> {
        let (w, h) = self.glyphs.size(text, style.size());
        Ok((w.max(0) as u32, h.max(0) as u32))
    }

    fn draw_text<TStyle: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &TStyle,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<B::ErrorType>> {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        let size = style.size();
        let (w, h) = self.glyphs.size(text, size);
        let anchor = style.anchor();
        let dx = match anchor.h_pos {
            HPos::Left => 0,
            HPos::Right => -w,
            HPos::Center => -w / 2,
        };
        let dy = match anchor.v_pos {
            VPos::Top => 0,
            VPos::Center => -h / 2,
            VPos::Bottom => -h,
        };
        let trans = style.transform();
        let (bw, bh) = self.inner.get_size();
        let inner = &mut self.inner;
        let mut result = Ok(());
        self.glyphs.render(text, size, |x, y, coverage| {
            if result.is_err() || coverage <= 0.0 {
                return;
            }
            let (x, y) = trans.transform(x + dx, y + dy);
            let (x, y) = (pos.0 + x, pos.1 + y);
            if x >= 0 && y >= 0 && (x as u32) < bw && (y as u32) < bh {
                let c = BackendColor {
                    alpha: color.alpha * coverage.min(1.0) as f64,
                    rgb: color.rgb,
                };
                result = inner.draw_pixel((x, y), c);
            }
        });
        result
    }
}
