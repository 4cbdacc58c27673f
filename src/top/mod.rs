//! `replhub top`: a live terminal view of a running hub, polling its `/connections`.
//!
//! ```text
//!  every --interval: GET /connections (one request) ─► Poll ─┐
//!  keys (b r n s q) ─► TopSort ───────────────────────────────┼─► model::view ─► draw (ratatui)
//!  terminal size ─────────────────────────────────────────────┘
//! ```
//!
//! What is on screen is [`model::view`](crate::top::model::view), a pure function of the previous
//! and current polls, the sort and the size; this module only fetches, reads keys and draws. It
//! needs no mouse and fits 80x24, so it works over a plain SSH terminal.
pub mod fetch;
pub mod model;

use std::time::Duration;

use anyhow::Context as _;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Cell, Paragraph, Row, Table};
use ratatui::Frame;

use crate::time::Clock;
use model::{Poll, TopSort, View, COLUMNS};

/// What `top` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopOptions {
    /// The hub's metrics endpoint, `HOST:PORT`.
    pub metrics: String,
    /// The first sort.
    pub sort: TopSort,
    /// Time between polls.
    pub interval: Duration,
}

impl Default for TopOptions {
    fn default() -> Self {
        Self {
            metrics: "127.0.0.1:9093".to_owned(),
            sort: TopSort::Backlog,
            interval: Duration::from_secs(1),
        }
    }
}

/// Longest a poll may take (the server answers within its own 2 s scrape timeout).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs until `q`, Esc or Ctrl-C. The terminal is restored however it ends.
pub fn run(opts: &TopOptions) -> anyhow::Result<()> {
    let mut terminal = ratatui::try_init().context("cannot set up the terminal")?;
    let res = run_loop(&mut terminal, opts);
    ratatui::try_restore().context("cannot restore the terminal")?;
    res
}

fn run_loop(terminal: &mut ratatui::DefaultTerminal, opts: &TopOptions) -> anyhow::Result<()> {
    let clock = Clock::new();
    let interval_ms = u64::try_from(opts.interval.as_millis()).unwrap_or(u64::MAX).max(100);
    let path = format!("/connections?limit={}", crate::metrics::connections::MAX_LIMIT);
    let (mut prev, mut cur): (Option<Poll>, Option<Poll>) = (None, None);
    let mut error: Option<String> = None;
    let mut sort = opts.sort;
    let mut next_poll_ms = 0;
    loop {
        let now = clock.now().mono_ms;
        if now >= next_poll_ms {
            match fetch::connections(&opts.metrics, &path, FETCH_TIMEOUT) {
                Ok(page) => {
                    prev = cur.take();
                    cur = Some(Poll { at_ms: clock.now().mono_ms, page });
                    error = None;
                }
                Err(e) => error = Some(e.to_string()),
            }
            next_poll_ms = now + interval_ms;
        }
        let size = terminal.size()?;
        let v = model::view(
            &opts.metrics,
            prev.as_ref(),
            cur.as_ref(),
            error.as_deref(),
            sort,
            (size.width, size.height),
        );
        terminal.draw(|f| draw(f, &v))?;
        let wait = next_poll_ms.saturating_sub(clock.now().mono_ms);
        if event::poll(Duration::from_millis(wait))? {
            if let Event::Key(key) = event::read()? {
                if key.kind != KeyEventKind::Press {
                    continue;
                }
                match key.code {
                    KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                    KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => return Ok(()),
                    KeyCode::Char(c) => sort = sort.for_key(c).unwrap_or(sort),
                    _ => {}
                }
            }
        }
    }
}

/// Draws `v`: header lines, the table (the slowest worker reversed), the footer.
pub fn draw(frame: &mut Frame<'_>, v: &View) {
    let header_lines = u16::try_from(v.header.len()).unwrap_or(u16::MAX);
    let [top, table, bottom] =
        Layout::vertical([Constraint::Length(header_lines), Constraint::Min(1), Constraint::Length(1)])
            .areas(frame.area());
    frame.render_widget(
        Paragraph::new(v.header.iter().map(|l| Line::raw(l.as_str())).collect::<Vec<_>>()),
        top,
    );
    let widths = COLUMNS.iter().enumerate().map(|(i, (_, w))| {
        if i + 1 == COLUMNS.len() {
            Constraint::Min(*w)
        } else {
            Constraint::Length(*w)
        }
    });
    let heading = Row::new(COLUMNS.iter().map(|(h, _)| Cell::from(*h)))
        .style(Style::default().add_modifier(Modifier::BOLD | Modifier::UNDERLINED));
    let rows = v.rows.iter().map(|r| {
        let row = Row::new(r.cells.iter().map(|c| Cell::from(c.as_str())));
        if r.slowest {
            row.style(Style::default().add_modifier(Modifier::REVERSED | Modifier::BOLD))
        } else {
            row
        }
    });
    frame.render_widget(Table::new(rows, widths).header(heading).column_spacing(1), table);
    frame.render_widget(Paragraph::new(v.footer.as_str()), bottom);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::connections::{ConnEntry, ConnectionsPage};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    /// The screen as text, one string per line.
    fn screen(v: &View, width: u16, height: u16) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(width, height)).unwrap();
        t.draw(|f| draw(f, v)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..height)
            .map(|y| {
                (0..width).map(|x| buf[(x, y)].symbol().to_owned()).collect::<String>().trim_end().to_owned()
            })
            .collect()
    }

    #[test]
    fn draws_an_80x24_screen() {
        let page = ConnectionsPage {
            cores: 1,
            cores_answered: 1,
            total: 1,
            connections: vec![ConnEntry {
                name: "synchrotron1".to_owned(),
                backlog_bytes: 2048,
                ..ConnEntry::default()
            }],
            ..ConnectionsPage::default()
        };
        let poll = Poll { at_ms: 1, page };
        let v = model::view("h:9093", None, Some(&poll), None, TopSort::Backlog, (80, 24));
        let lines = screen(&v, 80, 24);
        assert!(lines[0].starts_with("replhub top h:9093  sort: backlog"), "{lines:#?}");
        assert!(lines[3].starts_with("WORKER"), "{lines:#?}");
        assert!(lines[3].ends_with("STREAMS"), "{lines:#?}");
        assert!(lines[4].starts_with(">synchrotron1"), "{lines:#?}");
        assert!(lines[4].contains("2.0K"), "{lines:#?}");
    }
}
