//! The Prometheus text exposition as samples, and `promtool check metrics`.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

/// Samples by series, the labels in a canonical (sorted) order.
#[derive(Debug, Clone, Default)]
pub struct Samples(pub BTreeMap<String, f64>);

impl Samples {
    /// Parses every sample line; a line that does not parse panics.
    pub fn parse(text: &str) -> Samples {
        let mut out = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("a metrics line without a value: {line:?}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|e| panic!("a metrics value does not parse ({e}): {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                None => (series, Vec::new()),
                Some((name, rest)) => {
                    let inner = rest
                        .strip_suffix('}')
                        .unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
                    (name, parse_labels(inner, line))
                }
            };
            let refs: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            out.insert(key(name, &refs), value);
        }
        Samples(out)
    }

    /// The sample of `name` with exactly these labels.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0.get(&key(name, labels)).copied()
    }

    /// Like [`Self::get`], panicking (with the series names present) when absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            let near: Vec<&String> = self.0.keys().filter(|k| k.starts_with(name)).collect();
            panic!("no sample {}; present: {near:#?}", key(name, labels))
        })
    }
}

fn key(name: &str, labels: &[(&str, &str)]) -> String {
    let mut l: Vec<_> = labels.to_vec();
    l.sort_unstable();
    let inner: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{name}{{{}}}", inner.join(","))
}

/// `a="x",b="y"` (values without escapes, which tessera's label values never need).
fn parse_labels(inner: &str, line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = inner;
    while !rest.is_empty() {
        let (k, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("a label without a value: {line:?}"));
        let (v, after) = after
            .split_once('"')
            .unwrap_or_else(|| panic!("an unterminated label value: {line:?}"));
        out.push((k.to_string(), v.to_string()));
        rest = after.strip_prefix(',').unwrap_or(after);
    }
    out
}

/// Runs `promtool check metrics` on `text`. The exposition must parse; promtool 2.42's
/// lints may only name what vLLM's metric names imply (the `tessera:` colon, and the
/// histogram named `iteration_tokens_total`), as in the server's own unit test.
/// Fails when promtool is not installed.
pub fn promtool_check(text: &str) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!(
                "cannot run promtool ({e}): install it (Debian package `prometheus`: \
                 apt-get install prometheus; scripts/test installs it)"
            )
        })?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .map_err(|e| format!("writing to promtool: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("promtool: {e}"))?;
    let report =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    if !matches!(out.status.code(), Some(0) | Some(3)) {
        return Err(format!("promtool failed ({}):\n{report}", out.status));
    }
    let unknown: Vec<&str> = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| {
            !(l.ends_with("metric names should not contain ':'")
                || *l
                    == r#"tessera:iteration_tokens_total non-counter metrics should not have "_total" suffix"#)
        })
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "promtool ({}) reported findings other than the known vLLM-name lints:\n{}",
            out.status,
            unknown.join("\n")
        ));
    }
    if out.status.code() == Some(3) && report.trim().is_empty() {
        return Err("promtool exited 3 without findings".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_found_whatever_the_label_order() {
        let s = Samples::parse(
            "# HELP x y\n# TYPE x counter\nx{b=\"2\",a=\"1\"} 3\ny 4.5\nz_bucket{le=\"+Inf\"} 7\n",
        );
        assert_eq!(s.get("x", &[("a", "1"), ("b", "2")]), Some(3.0));
        assert_eq!(s.value("y", &[]), 4.5);
        assert_eq!(s.value("z_bucket", &[("le", "+Inf")]), 7.0);
    }

    #[test]
    fn promtool_check_refuses_what_does_not_parse_or_other_lints() {
        let good = "# HELP tessera:x_total X.\n# TYPE tessera:x_total counter\ntessera:x_total 1\n";
        promtool_check(good).unwrap();
        let err = promtool_check("tessera:x_total{a=\"1\" 1\n").unwrap_err();
        assert!(err.contains("promtool failed"), "{err}");
        // A counter without _total is a lint outside the known ones.
        let err = promtool_check("# HELP x X.\n# TYPE x counter\nx 1\n").unwrap_err();
        assert!(err.contains("other than the known"), "{err}");
    }
}
