//! Number rewrite ("Dial Rules") with SIP.TG's semantics: rules apply in order; `left=right`
//! replaces what the regex `left` matches with `right` (`\1` or `$1` for groups) and is skipped
//! when nothing matches; a rule without `=` is a filter the number must match, or the call has
//! no route. `.*=` turns any input into nothing (then the default number is used); a lone `=`
//! resets to no rules. Rules may be wrapped in backticks (as the bot needs, against emoji).

use regex::Regex;

/// One compiled rule.
#[derive(Debug, Clone)]
enum Rule {
    Replace(Regex, String),
    Filter(Regex),
}

/// An ordered rule list.
#[derive(Debug, Clone, Default)]
pub struct DialRules(Vec<Rule>);

/// A rule that does not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dial rule {index} ({rule:?}): {why}")]
pub struct RuleError {
    pub index: usize,
    pub rule: String,
    pub why: String,
}

/// `\1` (SIP.TG's, sed-style) → `${1}` (the regex crate's).
fn replacement(right: &str) -> String {
    let mut out = String::with_capacity(right.len());
    let mut chars = right.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                chars.next();
                out.push_str(&format!("${{{d}}}"));
                continue;
            }
        }
        out.push(c);
    }
    out
}

impl DialRules {
    /// Compiles `rules`.
    pub fn new<S: AsRef<str>>(rules: &[S]) -> Result<Self, RuleError> {
        let mut out = Vec::new();
        for (index, raw) in rules.iter().enumerate() {
            let rule = raw.as_ref().trim().trim_matches('`');
            if rule == "=" {
                out.clear();
                continue;
            }
            let err = |why: String| RuleError {
                index,
                rule: rule.to_string(),
                why,
            };
            match rule.split_once('=') {
                Some((left, right)) => {
                    let re = Regex::new(left).map_err(|e| err(e.to_string()))?;
                    out.push(Rule::Replace(re, replacement(right)));
                }
                None => {
                    let re = Regex::new(rule).map_err(|e| err(e.to_string()))?;
                    out.push(Rule::Filter(re));
                }
            }
        }
        Ok(Self(out))
    }

    /// The number after the rules, or `None` when a filter rejects it.
    pub fn apply(&self, number: &str) -> Option<String> {
        let mut n = number.to_string();
        for rule in &self.0 {
            match rule {
                Rule::Replace(re, with) => {
                    if re.is_match(&n) {
                        n = re.replace_all(&n, with.as_str()).into_owned();
                    }
                }
                Rule::Filter(re) => {
                    if !re.is_match(&n) {
                        return None;
                    }
                }
            }
        }
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn siptg_examples() {
        let r = DialRules::new(&["[^+*#\\w]=", "^8=7"]).unwrap();
        assert_eq!(r.apply("8 (999) 123-45-67").as_deref(), Some("79991234567"));
        let r = DialRules::new(&["^(8|\\+7)([0-9]{10})$=7\\2"]).unwrap();
        assert_eq!(r.apply("+79991234567").as_deref(), Some("79991234567"));
        assert_eq!(r.apply("89991234567").as_deref(), Some("79991234567"));
        assert_eq!(
            r.apply("12345").as_deref(),
            Some("12345"),
            "no match: rule skipped"
        );
        let r = DialRules::new(&[".*="]).unwrap();
        assert_eq!(r.apply("anything").as_deref(), Some(""));
        let r = DialRules::new(&["`^00=+`"]).unwrap();
        assert_eq!(r.apply("0044123").as_deref(), Some("+44123"));
        // A lone `=` resets.
        let r = DialRules::new(&[".*=", "="]).unwrap();
        assert_eq!(r.apply("42").as_deref(), Some("42"));
        // A filter.
        let r = DialRules::new(&["^\\+?[0-9]+$"]).unwrap();
        assert_eq!(r.apply("+123").as_deref(), Some("+123"));
        assert_eq!(r.apply("@user"), None);
        let e = DialRules::new(&["ok=", "(unclosed="]).unwrap_err();
        assert_eq!(e.index, 1);
    }
}
