//! Segment patterns, shared by room permissions (`task:*`, separator `:`) and event filters
//! (`users.*.deleted`, separator `.`).
//!
//! `*` stands for exactly one whole segment and `**` for any number of segments (zero or
//! more). Any other segment matches only itself, so `feature:*` grants `feature:users` but
//! not `feature:users:entity:user`: a wider grant has to say `feature:**`.

/// Longest pattern accepted from a client or a token, in bytes: room names are at most 200.
pub const MAX_PATTERN_BYTES: usize = 256;

/// Most segments in a pattern from a client or a token. Matching costs up to (segments + 1) x
/// (name segments + 1) steps per pattern, on the consumer thread, for every recipient.
pub const MAX_PATTERN_SEGMENTS: usize = 32;

/// Most patterns in one `events` filter: every record of the room is matched against each.
pub const MAX_FILTER_PATTERNS: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("empty pattern")]
    Empty,
    #[error("pattern {0:?}: '*' must stand for a whole segment")]
    PartialStar(String),
    #[error("a pattern of {0} bytes is over the limit of {max} bytes", max = MAX_PATTERN_BYTES)]
    TooLong(usize),
    #[error(
        "a pattern of {0} segments is over the limit of {max} segments",
        max = MAX_PATTERN_SEGMENTS
    )]
    TooManySegments(usize),
    #[error(
        "{0} patterns are over the limit of {max} per filter",
        max = MAX_FILTER_PATTERNS
    )]
    TooManyPatterns(usize),
}

impl PatternError {
    /// A refusal for size, not syntax: counted apart, since it is how an attack shows.
    pub fn is_limit(&self) -> bool {
        matches!(
            self,
            PatternError::TooLong(_)
                | PatternError::TooManySegments(_)
                | PatternError::TooManyPatterns(_)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Exact(String),
    One,
    Any,
}

impl Seg {
    fn accepts(&self, part: &str) -> bool {
        match self {
            Seg::Exact(e) => e == part,
            Seg::One => true,
            Seg::Any => unreachable!("`**` is handled by the matcher"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    sep: char,
    segs: Vec<Seg>,
}

impl Pattern {
    /// Parses a pattern within the limits above.
    pub fn parse(source: &str, sep: char) -> Result<Pattern, PatternError> {
        // Length first, so that no error message repeats more than the limit's worth of input.
        if source.len() > MAX_PATTERN_BYTES {
            return Err(PatternError::TooLong(source.len()));
        }
        let segments = source.split(sep).count();
        if segments > MAX_PATTERN_SEGMENTS {
            return Err(PatternError::TooManySegments(segments));
        }
        Pattern::compile(source, sep)
    }

    /// Parses a pattern of any size. Consecutive `**` are merged: they match exactly what
    /// one does.
    fn compile(source: &str, sep: char) -> Result<Pattern, PatternError> {
        if source.is_empty() {
            return Err(PatternError::Empty);
        }
        let mut segs = Vec::new();
        for s in source.split(sep) {
            let seg = match s {
                "*" => Seg::One,
                "**" => Seg::Any,
                s if s.contains('*') => return Err(PatternError::PartialStar(source.into())),
                s => Seg::Exact(s.to_string()),
            };
            if !(seg == Seg::Any && segs.last() == Some(&Seg::Any)) {
                segs.push(seg);
            }
        }
        Ok(Pattern { sep, segs })
    }

    /// A room pattern (`:`-separated).
    pub fn room(source: &str) -> Result<Pattern, PatternError> {
        Pattern::parse(source, ':')
    }

    /// An event-name pattern (`.`-separated).
    pub fn event(source: &str) -> Result<Pattern, PatternError> {
        Pattern::parse(source, '.')
    }

    pub fn matches(&self, name: &str) -> bool {
        let parts: Vec<&str> = name.split(self.sep).collect();
        glob(&self.segs, &parts, &mut 0)
    }
}

/// Matches in at most (segs + 1) x (parts + 1) steps, counted in `steps`.
///
/// Only the last `**` seen is ever retried, one more name segment each time: whatever an
/// earlier `**` could have absorbed instead, the later one can absorb as well, so retrying
/// earlier ones (as a recursive matcher does) only repeats failures, exponentially often.
fn glob(segs: &[Seg], parts: &[&str], steps: &mut usize) -> bool {
    let (mut p, mut n) = (0, 0);
    // The last `**`: the pattern index after it, and the name index its tail starts at.
    let mut retry: Option<(usize, usize)> = None;
    loop {
        *steps += 1;
        match segs.get(p) {
            Some(Seg::Any) => {
                p += 1;
                retry = Some((p, n));
                continue;
            }
            Some(seg) if n < parts.len() && seg.accepts(parts[n]) => {
                p += 1;
                n += 1;
                continue;
            }
            None if n == parts.len() => return true,
            _ => {}
        }
        match retry {
            Some((after, from)) if from < parts.len() => {
                retry = Some((after, from + 1));
                p = after;
                n = from + 1;
            }
            _ => return false,
        }
    }
}

/// An event filter: matches when any of its patterns does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFilter(Vec<Pattern>);

impl EventFilter {
    pub fn parse(sources: &[String]) -> Result<EventFilter, PatternError> {
        if sources.len() > MAX_FILTER_PATTERNS {
            return Err(PatternError::TooManyPatterns(sources.len()));
        }
        sources
            .iter()
            .map(|s| Pattern::event(s))
            .collect::<Result<_, _>>()
            .map(EventFilter)
    }

    pub fn matches(&self, event: &str) -> bool {
        self.0.iter().any(|p| p.matches(event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_star_is_one_segment() {
        let p = Pattern::room("task:*").unwrap();
        assert!(p.matches("task:7"));
        assert!(!p.matches("task"));
        assert!(!p.matches("task:7:x"));
        assert!(!p.matches("tasks:7"));
        assert!(!Pattern::room("feature:*")
            .unwrap()
            .matches("feature:users:entity:user"));
    }

    #[test]
    fn double_star_is_any_number_of_segments() {
        let p = Pattern::room("feature:**").unwrap();
        assert!(p.matches("feature:users"));
        assert!(p.matches("feature:users:entity:user"));
        assert!(!p.matches("task:1"));
        assert!(Pattern::room("**").unwrap().matches("anything:at:all"));
        let e = Pattern::event("users.**.deleted").unwrap();
        assert!(e.matches("users.deleted"));
        assert!(e.matches("users.user.deleted"));
        assert!(!e.matches("users.user.created"));
    }

    #[test]
    fn exact_and_mixed() {
        let e = Pattern::event("users.*.deleted").unwrap();
        assert!(e.matches("users.user.deleted"));
        assert!(!e.matches("rbac.user.deleted"));
        assert!(Pattern::room("user:42").unwrap().matches("user:42"));
        assert!(!Pattern::room("user:42").unwrap().matches("user:420"));
        assert!(Pattern::room("task-*").is_err());
        assert!(Pattern::room("").is_err());
    }

    #[test]
    fn filters_match_any() {
        let f = EventFilter::parse(&["a.*".into(), "b.c".into()]).unwrap();
        assert!(f.matches("a.x"));
        assert!(f.matches("b.c"));
        assert!(!f.matches("b.d"));
    }

    /// The recursive matcher this module used to have: right, and exponential.
    fn reference(segs: &[Seg], parts: &[&str]) -> bool {
        reference_counting(segs, parts, &mut 0)
    }

    fn reference_counting(segs: &[Seg], parts: &[&str], steps: &mut usize) -> bool {
        *steps += 1;
        match segs.split_first() {
            None => parts.is_empty(),
            Some((Seg::Any, rest)) => {
                (0..=parts.len()).any(|skip| reference_counting(rest, &parts[skip..], steps))
            }
            Some((seg, rest)) => match parts.split_first() {
                None => false,
                Some((part, tail)) => seg.accepts(part) && reference_counting(rest, tail, steps),
            },
        }
    }

    /// Every sequence of 1 to `max` items drawn from `alphabet`.
    fn words<'a>(alphabet: &[&'a str], max: usize) -> Vec<Vec<&'a str>> {
        let mut all: Vec<Vec<&str>> = Vec::new();
        let mut last = vec![Vec::new()];
        for _ in 0..max {
            last = last
                .iter()
                .flat_map(|w| {
                    alphabet.iter().map(move |a| {
                        let mut w = w.clone();
                        w.push(*a);
                        w
                    })
                })
                .collect();
            all.extend(last.iter().cloned());
        }
        all
    }

    #[test]
    fn agrees_with_the_recursive_matcher_on_every_small_case() {
        let names = words(&["a", "b"], 6);
        let mut compared = 0;
        for pattern in words(&["a", "b", "*", "**"], 5) {
            let raw: Vec<Seg> = pattern
                .iter()
                .map(|s| match *s {
                    "*" => Seg::One,
                    "**" => Seg::Any,
                    s => Seg::Exact(s.into()),
                })
                .collect();
            let compiled = Pattern::event(&pattern.join(".")).unwrap();
            for name in &names {
                assert_eq!(
                    compiled.matches(&name.join(".")),
                    reference(&raw, name),
                    "{pattern:?} against {name:?}"
                );
                compared += 1;
            }
        }
        assert_eq!(compared, 1364 * 126);
    }

    /// Steps for `pattern` (of any size) against `name`, and the bound they must stay under.
    fn steps(pattern: &str, name: &str) -> (usize, usize) {
        let p = Pattern::compile(pattern, '.').unwrap();
        let parts: Vec<&str> = name.split('.').collect();
        let mut steps = 0;
        assert!(!glob(&p.segs, &parts, &mut steps));
        (steps, (p.segs.len() + 1) * (parts.len() + 1))
    }

    #[test]
    fn work_is_bounded_by_pattern_times_name_segments() {
        let name = vec!["a"; 64].join(".");
        // 2,000 `**` then a miss: the recursive matcher would walk C(2064, 64) states.
        let merged = format!("{}zzz", "**.".repeat(2000));
        assert_eq!(Pattern::compile(&merged, '.').unwrap().segs.len(), 2);
        let (taken, bound) = steps(&merged, &name);
        assert!(taken <= bound, "{taken} steps, bound {bound}");
        // Stars that cannot be merged, each followed by a segment that matches.
        let alternating = format!("{}zzz", "**.a.".repeat(1000));
        let (taken, bound) = steps(&alternating, &name);
        assert!(taken <= bound, "{taken} steps, bound {bound}");
        // The two-pointer matcher's own worst case: one star, a long tail that almost fits.
        let tail = format!("**.{}.b", vec!["a"; 40].join("."));
        let (taken, bound) = steps(&tail, &name);
        assert!(taken <= bound, "{taken} steps, bound {bound}");
        assert!(taken > 64, "the tail is retried at each offset: {taken}");

        // The same bound, which the recursive matcher breaks even on a small case.
        let raw = [vec![Seg::Any; 8], vec![Seg::Exact("zzz".into())]].concat();
        let mut recursive = 0;
        assert!(!reference_counting(&raw, &["a"; 8], &mut recursive));
        assert!(recursive > (raw.len() + 1) * 9, "{recursive} steps");
    }

    #[test]
    fn consecutive_double_stars_merge_and_still_match_zero_segments() {
        let p = Pattern::event("a.**.**.**.b").unwrap();
        assert_eq!(p, Pattern::event("a.**.b").unwrap());
        assert!(p.matches("a.b"));
        assert!(p.matches("a.x.y.b"));
        assert!(!p.matches("a.x.y"));
    }

    #[test]
    fn patterns_are_bounded_in_bytes_and_segments() {
        let longest = "x".repeat(MAX_PATTERN_BYTES);
        assert!(Pattern::room(&longest).is_ok());
        let over = format!("{longest}x");
        assert_eq!(Pattern::room(&over), Err(PatternError::TooLong(257)));
        assert_eq!(
            PatternError::TooLong(257).to_string(),
            "a pattern of 257 bytes is over the limit of 256 bytes"
        );
        let most = vec!["*"; MAX_PATTERN_SEGMENTS].join(".");
        assert!(Pattern::event(&most).is_ok());
        let more = format!("{most}.*");
        assert_eq!(
            Pattern::event(&more),
            Err(PatternError::TooManySegments(33))
        );
        assert!(PatternError::TooManySegments(33).is_limit());
        assert!(!PatternError::Empty.is_limit());
        // A partial star in a long pattern is refused for its length, not echoed back.
        let partial = format!("a*{}", "x".repeat(300));
        assert_eq!(Pattern::event(&partial), Err(PatternError::TooLong(302)));
    }

    #[test]
    fn filters_are_bounded_in_patterns() {
        let most: Vec<String> = (0..MAX_FILTER_PATTERNS).map(|i| format!("e.{i}")).collect();
        assert!(EventFilter::parse(&most).is_ok());
        let mut more = most.clone();
        more.push("e.x".into());
        assert_eq!(
            EventFilter::parse(&more),
            Err(PatternError::TooManyPatterns(17))
        );
        assert_eq!(
            PatternError::TooManyPatterns(17).to_string(),
            "17 patterns are over the limit of 16 per filter"
        );
    }
}
