//! Segment patterns, shared by room permissions (`task:*`, separator `:`) and event filters
//! (`users.*.deleted`, separator `.`).
//!
//! `*` stands for exactly one whole segment and `**` for any number of segments (zero or
//! more). Any other segment matches only itself, so `feature:*` grants `feature:users` but
//! not `feature:users:entity:user`: a wider grant has to say `feature:**`.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Exact(String),
    One,
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    sep: char,
    segs: Vec<Seg>,
}

impl Pattern {
    pub fn parse(source: &str, sep: char) -> Result<Pattern, String> {
        if source.is_empty() {
            return Err("empty pattern".into());
        }
        let segs = source
            .split(sep)
            .map(|s| match s {
                "*" => Ok(Seg::One),
                "**" => Ok(Seg::Any),
                s if s.contains('*') => Err(format!(
                    "pattern {source:?}: '*' must stand for a whole segment"
                )),
                s => Ok(Seg::Exact(s.to_string())),
            })
            .collect::<Result<_, _>>()?;
        Ok(Pattern { sep, segs })
    }

    /// A room pattern (`:`-separated).
    pub fn room(source: &str) -> Result<Pattern, String> {
        Pattern::parse(source, ':')
    }

    /// An event-name pattern (`.`-separated).
    pub fn event(source: &str) -> Result<Pattern, String> {
        Pattern::parse(source, '.')
    }

    pub fn matches(&self, name: &str) -> bool {
        let parts: Vec<&str> = name.split(self.sep).collect();
        match_segs(&self.segs, &parts)
    }
}

fn match_segs(segs: &[Seg], parts: &[&str]) -> bool {
    match segs.split_first() {
        None => parts.is_empty(),
        Some((Seg::Any, rest)) => (0..=parts.len()).any(|skip| match_segs(rest, &parts[skip..])),
        Some((seg, rest)) => match parts.split_first() {
            None => false,
            Some((part, tail)) => {
                let head_ok = match seg {
                    Seg::One => true,
                    Seg::Exact(e) => e == part,
                    Seg::Any => unreachable!(),
                };
                head_ok && match_segs(rest, tail)
            }
        },
    }
}

/// An event filter: matches when any of its patterns does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFilter(Vec<Pattern>);

impl EventFilter {
    pub fn parse(sources: &[String]) -> Result<EventFilter, String> {
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
}
