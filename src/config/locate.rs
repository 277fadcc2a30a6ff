//! Field paths and their positions in the config text (layer L1, part of `config`).
//!
//! Errors found after deserialising (a duplicate uid, an unknown pod workload...) only know the
//! field they are about, e.g. `workloads[1].workloadIps[0]`. [`Locator`] walks the YAML event
//! stream once with yaml-rust2's parser and remembers where every node starts, so such an error
//! can still name a line and column. Pure: text in, positions out.

use std::collections::HashMap;
use std::fmt;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// One step of a [`FieldPath`]: a mapping key or a sequence index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Segment {
    /// A mapping key, as written in the file (without quotes).
    Key(String),
    /// A 0-based sequence index.
    Index(usize),
}

/// A path from the document root to a field, e.g. `["workloads", 1, "workloadIps", 0]`.
/// Displayed the way serde_yaml displays its own paths: `workloads[1].workloadIps[0]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct FieldPath(pub Vec<Segment>);

impl FieldPath {
    /// The path of `key` inside this mapping.
    pub fn key(&self, key: impl Into<String>) -> FieldPath {
        let mut next = self.clone();
        next.0.push(Segment::Key(key.into()));
        next
    }

    /// The path of item `index` inside this sequence.
    pub fn index(&self, index: usize) -> FieldPath {
        let mut next = self.clone();
        next.0.push(Segment::Index(index));
        next
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str(".");
        }
        for (position, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if position == 0 => f.write_str(key)?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
}

impl Position {
    /// The start of the file: where errors about the file as a whole point.
    pub const START: Position = Position { line: 1, column: 1 };

    fn from_marker(marker: Marker) -> Position {
        // yaml-rust2 counts lines from 1 but columns from 0.
        Position {
            line: marker.line(),
            column: marker.col() + 1,
        }
    }
}

/// Where each node of a YAML document starts.
#[derive(Debug, Default)]
pub struct Locator {
    /// Where each node's value is (for a collection under a key: the key).
    positions: HashMap<FieldPath, Position>,
    /// Where each mapping key is, for errors about the key itself (`ports: {0: 80}`).
    keys: HashMap<FieldPath, Position>,
}

impl Locator {
    /// Indexes the first document of `text`. Text that does not parse as YAML yields an empty
    /// index (every lookup then answers the start of the file); serde reports the syntax error.
    pub fn new(text: &str) -> Locator {
        let mut walker = Walker {
            text: text.chars().collect(),
            ..Walker::default()
        };
        let mut parser = Parser::new_from_str(text);
        // A scan error leaves the index with what was seen before it; that is still useful.
        let _ = parser.load(&mut walker, false);
        Locator {
            positions: walker.positions,
            keys: walker.keys,
        }
    }

    /// Like [`locate`](Self::locate), but for an error about the mapping key at the end of
    /// `path` rather than its value.
    pub fn locate_key(&self, path: &FieldPath) -> Position {
        match self.keys.get(path) {
            Some(position) => *position,
            None => self.locate(path),
        }
    }

    /// The position of `path`, or of its nearest ancestor that is in the file (a field that was
    /// defaulted is reported at the mapping that lacks it).
    pub fn locate(&self, path: &FieldPath) -> Position {
        let mut segments = path.0.as_slice();
        loop {
            if let Some(position) = self.positions.get(&FieldPath(segments.to_vec())) {
                return *position;
            }
            match segments.split_last() {
                Some((_, parent)) => segments = parent,
                None => return Position::START,
            }
        }
    }
}

/// What the mapping on top of the stack expects next.
#[derive(Debug)]
enum MapState {
    Key,
    Value(String),
}

#[derive(Debug)]
enum Frame {
    Sequence { path: FieldPath, next: usize },
    Mapping { path: FieldPath, state: MapState },
}

/// The role of a node that is starting.
enum Role {
    /// A mapping key; its own path is the parent's plus the key text.
    Key(FieldPath),
    /// A value at this path.
    Value(FieldPath),
}

#[derive(Debug, Default)]
struct Walker {
    /// The text, to find where a node's tag starts (the parser marks the node after it).
    text: Vec<char>,
    stack: Vec<Frame>,
    positions: HashMap<FieldPath, Position>,
    keys: HashMap<FieldPath, Position>,
}

impl Walker {
    fn role(&mut self) -> Role {
        match self.stack.last_mut() {
            None => Role::Value(FieldPath::default()),
            Some(Frame::Sequence { path, next }) => {
                let role = Role::Value(path.index(*next));
                *next += 1;
                role
            }
            Some(Frame::Mapping {
                path,
                state: MapState::Key,
            }) => Role::Key(path.clone()),
            Some(Frame::Mapping {
                path,
                state: MapState::Value(key),
            }) => Role::Value(path.key(key.as_str())),
        }
    }

    /// A node ended; `key_text` is its text if it was a scalar.
    fn complete(&mut self, key_text: Option<String>) {
        if let Some(Frame::Mapping { state, .. }) = self.stack.last_mut() {
            *state = match state {
                MapState::Key => MapState::Value(key_text.unwrap_or_else(|| "?".to_string())),
                MapState::Value(_) => MapState::Key,
            };
        }
    }

    fn scalar(&mut self, text: String, position: Position) {
        match self.role() {
            Role::Key(parent) => {
                // A block mapping's start event is marked at its first `:`; its first key is
                // where a reader looks, so a mapping is placed when that key arrives.
                self.positions.entry(parent.clone()).or_insert(position);
                let path = parent.key(text.as_str());
                self.keys.insert(path.clone(), position);
                self.positions.insert(path, position);
                self.complete(Some(text));
            }
            Role::Value(path) => {
                // A scalar value is reported where the value is, not where its key is.
                self.positions.insert(path, position);
                self.complete(None);
            }
        }
    }

    fn collection_start(&mut self, position: Position, mapping: bool) {
        let path = match self.role() {
            Role::Key(parent) => parent.key("?"),
            Role::Value(path) => {
                // A collection under a key is reported at the key (already recorded), which is
                // what a reader looks for; a mapping elsewhere at its first key (see `scalar`).
                if !mapping {
                    self.positions.entry(path.clone()).or_insert(position);
                }
                path
            }
        };
        self.stack.push(if mapping {
            Frame::Mapping {
                path,
                state: MapState::Key,
            }
        } else {
            Frame::Sequence { path, next: 0 }
        });
    }
}

impl Walker {
    /// Where a node starts: at its tag when it has one on the same line (`!Exact a`, ztunnel's
    /// enum syntax), as serde_yaml reports errors there; yaml-rust2 marks the value after it.
    fn start(&self, marker: Marker, tagged: bool) -> Position {
        let position = Position::from_marker(marker);
        if !tagged {
            return position;
        }
        let mut index = marker.index().min(self.text.len());
        while index > 0 && matches!(self.text[index - 1], ' ' | '\t') {
            index -= 1;
        }
        let token_end = index;
        while index > 0 && !matches!(self.text[index - 1], ' ' | '\t' | '\n' | '[' | '{' | ',') {
            index -= 1;
        }
        if index == token_end || self.text[index] != '!' {
            return position;
        }
        // A tag yaml-rust2 reads differently from this scan (one with `/` in it, say) can put
        // the token's start before the marker's line start: keep the marker's own position
        // then (the config_parse fuzz target found the underflow).
        match position.column.checked_sub(marker.index() - index) {
            Some(column) if column >= 1 => Position {
                line: position.line,
                column,
            },
            _ => position,
        }
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, event: Event, marker: Marker) {
        let tagged = match &event {
            Event::Scalar(_, _, _, tag)
            | Event::SequenceStart(_, tag)
            | Event::MappingStart(_, tag) => tag.is_some(),
            _ => false,
        };
        let position = self.start(marker, tagged);
        match event {
            Event::Scalar(text, ..) => self.scalar(text, position),
            Event::Alias(_) => self.scalar("*".to_string(), position),
            Event::SequenceStart(..) => self.collection_start(position, false),
            Event::MappingStart(..) => self.collection_start(position, true),
            Event::SequenceEnd | Event::MappingEnd => {
                self.stack.pop();
                self.complete(None);
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}
