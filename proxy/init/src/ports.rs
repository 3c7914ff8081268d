//! Port lists as Linkerd's proxy-init reads them (`4190,4191,25-27`) and as iptables' `multiport`
//! match wants them (`4190:4191,25:27`, at most 15 ports per rule).

use std::{fmt, str::FromStr};

/// The most ports one `-m multiport --dports` list may name; a range counts as two
/// (`XT_MULTI_PORTS` in the kernel's `xt_multiport.h`, and Linkerd's `IptablesMultiportLimit`).
pub const MULTIPORT_LIMIT: usize = 15;

/// An inclusive range of TCP ports; a single port is a range of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// Why a port or range was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    #[error("{0:?} is not a port (0-65535)")]
    NotAPort(String),
    #[error("{0:?} is not a range: write <first>-<last>")]
    NotARange(String),
    #[error("{0:?} is a range whose last port is below its first")]
    Backwards(String),
}

impl PortRange {
    pub const fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

    /// How many of the [`MULTIPORT_LIMIT`] slots this takes in a `multiport` list.
    fn slots(self) -> usize {
        if self.first == self.last { 1 } else { 2 }
    }
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    /// `80` or `8000-8080` (Linkerd's `ParsePortRange`), surrounding blanks ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| PortRangeError::NotAPort(p.trim().to_string()))
        };
        let mut bounds = s.split('-');
        let (first, last) = match (bounds.next(), bounds.next(), bounds.next()) {
            (Some(p), None, None) => (port(p)?, port(p)?),
            (Some(a), Some(b), None) => (port(a)?, port(b)?),
            _ => return Err(PortRangeError::NotARange(s.to_string())),
        };
        if last < first {
            return Err(PortRangeError::Backwards(s.to_string()));
        }
        Ok(Self { first, last })
    }
}

impl fmt::Display for PortRange {
    /// iptables' spelling: `80` or `8000:8080`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}:{}", self.first, self.last)
        }
    }
}

/// Sorts the ranges and joins those that overlap or touch, so that a port given twice (or inside
/// a range) costs no extra rule and the rules come out the same whatever order they were given in.
pub fn merge(ranges: impl IntoIterator<Item = PortRange>) -> Vec<PortRange> {
    let mut ranges: Vec<PortRange> = ranges.into_iter().collect();
    ranges.sort();
    let mut merged: Vec<PortRange> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(last) if u32::from(range.first) <= u32::from(last.last) + 1 => {
                last.last = last.last.max(range.last);
            }
            _ => merged.push(range),
        }
    }
    merged
}

/// Splits ranges into `multiport` lists of at most [`MULTIPORT_LIMIT`] slots each, in order.
pub fn multiport_lists(ranges: &[PortRange]) -> Vec<String> {
    let mut lists = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut used = 0;
    for range in ranges {
        if used + range.slots() > MULTIPORT_LIMIT {
            lists.push(current.join(","));
            current.clear();
            used = 0;
        }
        current.push(range.to_string());
        used += range.slots();
    }
    if !current.is_empty() {
        lists.push(current.join(","));
    }
    lists
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }

    #[test]
    fn parse() {
        let cases: &[(&str, Result<PortRange, PortRangeError>)] = &[
            ("80", Ok(r(80, 80))),
            (" 80 ", Ok(r(80, 80))),
            ("0", Ok(r(0, 0))),
            ("65535", Ok(r(65535, 65535))),
            ("25-27", Ok(r(25, 27))),
            ("22-22", Ok(r(22, 22))),
            ("1 - 3", Ok(r(1, 3))),
            ("65536", Err(PortRangeError::NotAPort("65536".into()))),
            ("-1", Err(PortRangeError::NotAPort("".into()))),
            ("", Err(PortRangeError::NotAPort("".into()))),
            ("http", Err(PortRangeError::NotAPort("http".into()))),
            ("1-2-3", Err(PortRangeError::NotARange("1-2-3".into()))),
            ("27-25", Err(PortRangeError::Backwards("27-25".into()))),
            ("80:81", Err(PortRangeError::NotAPort("80:81".into()))),
        ];
        for (input, want) in cases {
            assert_eq!(&input.parse::<PortRange>(), want, "{input:?}");
        }
    }

    #[test]
    fn merges() {
        let cases: &[(&[PortRange], &[PortRange])] = &[
            (&[], &[]),
            (&[r(4191, 4191), r(4190, 4190)], &[r(4190, 4191)]),
            (&[r(80, 80), r(80, 80)], &[r(80, 80)]),
            (&[r(1, 10), r(5, 6), r(12, 12)], &[r(1, 10), r(12, 12)]),
            (&[r(1, 10), r(11, 20)], &[r(1, 20)]),
            (&[r(65535, 65535), r(0, 65534)], &[r(0, 65535)]),
            (&[r(30, 40), r(1, 2)], &[r(1, 2), r(30, 40)]),
        ];
        for (input, want) in cases {
            assert_eq!(&merge(input.iter().copied()), want, "{input:?}");
        }
    }

    #[test]
    fn multiport_split() {
        let singles: Vec<PortRange> = (1..=16).map(|p| r(p * 2, p * 2)).collect();
        let cases: Vec<(Vec<PortRange>, Vec<&str>)> = vec![
            (vec![], vec![]),
            (vec![r(22, 22), r(25, 27), r(33, 33)], vec!["22,25:27,33"]),
            // Linkerd's own split case: eight ranges fill 15 slots only just.
            (
                vec![
                    r(22, 23),
                    r(25, 27),
                    r(33, 34),
                    r(35, 35),
                    r(37, 38),
                    r(50, 54),
                    r(56, 57),
                    r(60, 63),
                ],
                vec!["22:23,25:27,33:34,35,37:38,50:54,56:57,60:63"],
            ),
            (
                singles.clone(),
                vec!["2,4,6,8,10,12,14,16,18,20,22,24,26,28,30", "32"],
            ),
            // A range that would be the 16th slot moves to the next rule whole.
            (
                singles[..14].iter().copied().chain([r(100, 200)]).collect(),
                vec!["2,4,6,8,10,12,14,16,18,20,22,24,26,28", "100:200"],
            ),
        ];
        for (input, want) in cases {
            assert_eq!(multiport_lists(&input), want, "{input:?}");
        }
    }
}
