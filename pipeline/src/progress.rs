//! Progress bars that also work in logs: on a terminal, indicatif's bar on stderr; when stderr
//! is a file or a pipe (CI, `nohup`, a Slurm job's log), where indicatif draws nothing, the same
//! bar as a plain line every `DROPPOS_PROGRESS_SECS` seconds (default 15), so that long work
//! is never silent.

use std::io::{self, IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, TermLike};

/// A bar of `len` steps (`None`: unknown length) drawn as described in the module docs.
pub fn bar(len: Option<u64>) -> ProgressBar {
    ProgressBar::with_draw_target(len, draw_target())
}

/// stderr itself on a terminal, else periodic lines on stderr.
pub fn draw_target() -> ProgressDrawTarget {
    if io::stderr().is_terminal() {
        return ProgressDrawTarget::stderr();
    }
    let secs = std::env::var("DROPPOS_PROGRESS_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(15.0);
    ProgressDrawTarget::term_like_with_hz(Box::new(LogLines::new(Duration::from_secs_f64(secs))), 1)
}

/// A [`TermLike`] that turns redraws into one stderr line per `every` (none before `every` has
/// passed, so that short work prints nothing); cursor movements and clears are no-ops.
#[derive(Debug)]
struct LogLines {
    every: Duration,
    state: Mutex<(Instant, String)>,
}

impl LogLines {
    fn new(every: Duration) -> Self {
        LogLines {
            every,
            state: Mutex::new((Instant::now(), String::new())),
        }
    }

    fn push(&self, s: &str) {
        if let Ok(mut st) = self.state.lock() {
            if !st.1.is_empty() {
                st.1.push(' ');
            }
            st.1.push_str(s.trim());
        }
    }
}

impl TermLike for LogLines {
    fn width(&self) -> u16 {
        100
    }
    fn move_cursor_up(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> io::Result<()> {
        self.push(s);
        Ok(())
    }
    fn write_str(&self, s: &str) -> io::Result<()> {
        self.push(s);
        Ok(())
    }
    fn clear_line(&self) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let Ok(mut st) = self.state.lock() else {
            return Ok(());
        };
        let line = std::mem::take(&mut st.1);
        if !line.is_empty() && st.0.elapsed() >= self.every {
            st.0 = Instant::now();
            // A closed stderr must not fail the work the bar reports on.
            let _ = writeln!(io::stderr().lock(), "{line}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_throttled_and_joined() {
        let t = LogLines::new(Duration::from_millis(50));
        t.write_line("a [==>  ] 1/4").unwrap();
        t.write_str("msg").unwrap();
        assert_eq!(t.state.lock().unwrap().1, "a [==>  ] 1/4 msg");
        // Before `every` has passed nothing is printed, and the buffer is dropped.
        t.flush().unwrap();
        assert!(t.state.lock().unwrap().1.is_empty());
        let before = t.state.lock().unwrap().0;
        std::thread::sleep(Duration::from_millis(60));
        t.write_str("b").unwrap();
        t.flush().unwrap();
        assert!(t.state.lock().unwrap().0 > before, "printed, clock reset");
    }
}
