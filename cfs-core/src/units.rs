//! Durations and dates as users type them: `30d`, `12h`, `90s`, `2026-11-29`.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnitError {
    #[error("{0:?} is not a duration: use a number with s, m, h, d or w (30d, 12h, 90s)")]
    Duration(String),
    #[error("{0:?} is not a date: use YYYY-MM-DD (UTC midnight) or unix seconds")]
    Date(String),
}

/// Seconds in a duration such as `30d`, `12h`, `15m`, `90s`, `2w` or a bare number of
/// seconds.
pub fn parse_duration(s: &str) -> Result<u64, UnitError> {
    let bad = || UnitError::Duration(s.to_string());
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mul = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(mul).ok_or_else(bad)
}

/// `parse_duration` for command-line parsers (clap's `value_parser`).
pub fn duration_arg(s: &str) -> Result<u64, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

/// `parse_date` for command-line parsers.
pub fn date_arg(s: &str) -> Result<u64, String> {
    parse_date(s).map_err(|e| e.to_string())
}

/// Unix seconds of `YYYY-MM-DD` (midnight UTC), or of a bare number of unix seconds.
pub fn parse_date(s: &str) -> Result<u64, UnitError> {
    let bad = || UnitError::Date(s.to_string());
    let t = s.trim();
    if let Ok(n) = t.parse::<u64>() {
        return Ok(n);
    }
    let parts: Vec<&str> = t.split('-').collect();
    let [y, m, d] = parts.as_slice() else {
        return Err(bad());
    };
    let (y, m, d): (i64, i64, i64) = (
        y.parse().map_err(|_| bad())?,
        m.parse().map_err(|_| bad())?,
        d.parse().map_err(|_| bad())?,
    );
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_dates() {
        assert_eq!(parse_duration("30d"), Ok(30 * 86_400));
        assert_eq!(parse_duration("12h"), Ok(43_200));
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("2w"), Ok(14 * 86_400));
        assert!(parse_duration("3x").is_err());
        assert!(parse_duration("d").is_err());
        assert_eq!(parse_date("1970-01-01"), Ok(0));
        assert_eq!(parse_date("2000-03-01"), Ok(951_868_800));
        assert_eq!(parse_date("2026-11-29"), Ok(1_795_910_400));
        assert_eq!(parse_date("1234"), Ok(1234));
        assert!(parse_date("2026-13-01").is_err());
    }
}
