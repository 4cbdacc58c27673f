//! "Would `json.loads` accept this?", fast: simd-json first, [`parse`] only when it says no.

use std::cell::RefCell;

use super::error::JsonError;
use super::parse::parse;
use super::MAX_DEPTH;

/// Reusable buffers for [`Scratch::validate`]: simd-json parses in place, so the input is
/// copied into a padded buffer kept here between calls.
pub struct Scratch {
    input: Vec<u8>,
    buffers: simd_json::Buffers,
    tape: simd_json::Tape<'static>,
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scratch").field("capacity", &self.input.capacity()).finish()
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

impl Scratch {
    /// Buffers larger than this are dropped after use rather than kept.
    const KEEP_MAX: usize = 1 << 20;

    /// Empty buffers.
    pub fn new() -> Self {
        Self {
            input: Vec::new(),
            buffers: simd_json::Buffers::new(1024),
            tape: simd_json::Tape::null().reset(),
        }
    }

    /// Whether `json.loads` would accept `bytes`; the error is [`parse`]'s. See [`validate`].
    pub fn validate(&mut self, bytes: &[u8]) -> Result<(), JsonError> {
        let fast_ok = self.simd_accepts(bytes);
        if bytes.len() > Self::KEEP_MAX {
            *self = Self::new();
        }
        if fast_ok && !too_deep(bytes) {
            return Ok(());
        }
        parse(bytes).map(drop)
    }

    fn simd_accepts(&mut self, bytes: &[u8]) -> bool {
        self.input.clear();
        self.input.extend_from_slice(bytes);
        self.input.resize(bytes.len() + simd_json::INPUT_PADDING, b' ');
        let mut tape = std::mem::replace(&mut self.tape, simd_json::Tape::null()).reset();
        let ok =
            simd_json::fill_tape_padded(&mut self.input, bytes.len(), &mut self.buffers, &mut tape).is_ok();
        self.tape = tape.reset();
        ok
    }
}

/// Whether valid JSON `bytes` nests deeper than [`MAX_DEPTH`]. Counting brackets first keeps
/// the common case to one vectorisable pass.
fn too_deep(bytes: &[u8]) -> bool {
    let opens = bytes.iter().filter(|&&b| b == b'[' || b == b'{').count();
    if opens <= MAX_DEPTH {
        return false;
    }
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for &b in bytes {
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::new());
}

/// Whether Python's `json.loads` (as Synapse runs it) would accept `bytes`, with [`parse`]'s
/// error if not. Uses simd-json on a per-thread scratch copy first, and [`parse`] only when
/// simd-json rejects, so NaN, huge integers and the like still pass.
pub fn validate(bytes: &[u8]) -> Result<(), JsonError> {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => s.validate(bytes),
        Err(_) => Scratch::new().validate(bytes),
    })
}
