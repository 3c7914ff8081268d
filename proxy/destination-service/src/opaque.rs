//! `config.linkerd.io/opaque-ports`: a comma-separated list of ports and ranges
//! (`3306,5432-5440`), as Linkerd writes it.

use std::ops::RangeInclusive;

/// A set of ports, as sorted inclusive ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortSet(Vec<RangeInclusive<u16>>);

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| r.contains(&port))
    }
}

/// Parses the annotation's value; an error names the first item that is not a port or range.
pub fn parse(value: &str) -> Result<PortSet, String> {
    let mut ranges = Vec::new();
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let port = |s: &str| {
            s.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    format!(
                        "{item:?} is not a port (1-65535) or a range of ports such as 5432-5440"
                    )
                })
        };
        let range = match item.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (port(lo)?, port(hi)?);
                if lo > hi {
                    return Err(format!("{item:?}: the range is empty"));
                }
                lo..=hi
            }
            None => {
                let p = port(item)?;
                p..=p
            }
        };
        ranges.push(range);
    }
    ranges.sort_by_key(|r| *r.start());
    Ok(PortSet(ranges))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_ranges() {
        let cases: &[(&str, &[u16], &[u16])] = &[
            ("3306", &[3306], &[3307, 80]),
            ("3306, 5432-5440", &[3306, 5432, 5436, 5440], &[5441, 5431]),
            ("", &[], &[1, 3306]),
            ("25,,587", &[25, 587], &[26]),
        ];
        for (value, inside, outside) in cases {
            let set = parse(value).unwrap();
            for p in *inside {
                assert!(set.contains(*p), "{value}: {p}");
            }
            for p in *outside {
                assert!(!set.contains(*p), "{value}: {p}");
            }
        }
    }

    #[test]
    fn bad_values_name_the_item() {
        for (value, item) in [
            ("mysql", "mysql"),
            ("3306,70000", "70000"),
            ("10-5", "10-5"),
            ("0", "0"),
            ("5-", "5-"),
        ] {
            let err = parse(value).unwrap_err();
            assert!(err.contains(item), "{value}: {err}");
        }
    }
}
