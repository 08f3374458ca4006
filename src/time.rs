//! Wall-clock helpers. No time-zone database: everything is UTC.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Formats a unix time (seconds, UTC) in Go's `time.ANSIC` layout,
/// `Mon Jan _2 15:04:05 2006`: the day of the month is padded with a space.
///
/// `POST /ping` uses it to stay compatible with the scaling-ws demo it replaces.
pub fn ansic(unix_secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_secs / 86_400;
    let secs_of_day = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{} {} {:>2} {:02}:{:02}:{:02} {}",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        day,
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60,
        year
    )
}

/// Days since 1970-01-01 to (year, month 1–12, day 1–31); Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_go_ansic() {
        assert_eq!(ansic(0), "Thu Jan  1 00:00:00 1970");
        // 2026-11-21T21:10:00Z, the example in the protocol docs.
        assert_eq!(ansic(1_795_295_400), "Sat Nov 21 21:10:00 2026");
        // Go's reference time: Mon Jan 2 15:04:05 MST 2006 = 22:04:05 UTC.
        assert_eq!(ansic(1_136_239_445), "Mon Jan  2 22:04:05 2006");
        // A leap day.
        assert_eq!(ansic(951_782_400), "Tue Feb 29 00:00:00 2000");
    }
}
