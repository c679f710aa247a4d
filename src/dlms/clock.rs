//! COSEM date-time (the 12-byte octet-string of IEC 62056-6-2 4.1.6.1, as carried by the Clock
//! object and by profile buffers) to and from Unix milliseconds. Pure: no I/O, no clock reads.
//!
//! Layout: year (2, 0xFFFF = unspecified), month, day, weekday (0xFF = unspecified), hour,
//! minute, second, hundredths (0xFF = unspecified), deviation (i16 minutes, 0x8000 =
//! unspecified), clock status. The deviation follows the Blue Book: UTC = local time +
//! deviation (so CET is -60). An unspecified deviation is read as UTC.

/// Status bit: the meter says its clock value is invalid.
pub const STATUS_INVALID: u8 = 0x01;
/// Status bit: the meter says its clock value is doubtful.
pub const STATUS_DOUBTFUL: u8 = 0x02;
/// Status bit: daylight saving time is active (already part of the deviation).
pub const STATUS_DAYLIGHT_SAVING: u8 = 0x80;

/// "Not specified" in the deviation field.
const DEVIATION_UNSPECIFIED: i16 = i16::MIN;

/// Why a date-time cannot be turned into an instant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not a 12-byte octet-string / date-time.
    #[error("not a cosem date-time ({0} bytes)")]
    Length(usize),
    /// A field is unspecified (0xFF/0xFFFF) or out of range, so no instant is meant.
    #[error("date-time field {0} unspecified or out of range")]
    Field(&'static str),
    /// The meter flags the value as invalid.
    #[error("meter marks the clock value invalid (status 0x{0:02x})")]
    Invalid(u8),
}

/// A decoded date-time: the instant and what the meter said about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instant {
    /// Milliseconds since the Unix epoch (UTC).
    pub unix_ms: i64,
    /// The deviation used (minutes, UTC = local + deviation); 0 when unspecified.
    pub deviation_min: i16,
    /// The clock status byte (0xFF, "not specified", is reported as 0).
    pub status: u8,
}

impl Instant {
    /// Whether the meter flags the value as doubtful.
    pub fn doubtful(&self) -> bool {
        self.status & STATUS_DOUBTFUL != 0
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// The instant a 12-byte date-time names, honouring deviation and status.
pub fn decode(b: &[u8]) -> Result<Instant, Error> {
    let b: &[u8; 12] = b.try_into().map_err(|_| Error::Length(b.len()))?;
    let year = u16::from_be_bytes([b[0], b[1]]);
    if year == 0xFFFF {
        return Err(Error::Field("year"));
    }
    let (month, day, hour, minute, second) = (b[2], b[3], b[5], b[6], b[7]);
    if !(1..=12).contains(&month) {
        return Err(Error::Field("month"));
    }
    let y = i64::from(year);
    if day == 0 || u32::from(day) > days_in_month(y, u32::from(month)) {
        return Err(Error::Field("day"));
    }
    if hour > 23 {
        return Err(Error::Field("hour"));
    }
    if minute > 59 {
        return Err(Error::Field("minute"));
    }
    if second > 59 {
        return Err(Error::Field("second"));
    }
    let hundredths = match b[8] {
        0xFF => 0,
        h if h < 100 => h,
        _ => return Err(Error::Field("hundredths")),
    };
    let deviation = match i16::from_be_bytes([b[9], b[10]]) {
        DEVIATION_UNSPECIFIED => 0,
        d if (-720..=840).contains(&d) => d,
        _ => return Err(Error::Field("deviation")),
    };
    let status = if b[11] == 0xFF { 0 } else { b[11] };
    if status & STATUS_INVALID != 0 {
        return Err(Error::Invalid(status));
    }
    let days = days_from_civil(y, u32::from(month), u32::from(day));
    let local_s =
        days * 86_400 + i64::from(hour) * 3600 + i64::from(minute) * 60 + i64::from(second);
    let utc_s = local_s + i64::from(deviation) * 60;
    Ok(Instant {
        unix_ms: utc_s * 1000 + i64::from(hundredths) * 10,
        deviation_min: deviation,
        status,
    })
}

/// A 12-byte date-time for `unix_ms` as local time of a meter whose deviation is
/// `deviation_min` (UTC = local + deviation), status 0: what a clock write sends.
pub fn encode(unix_ms: i64, deviation_min: i16) -> [u8; 12] {
    let mut b = encode_utc(unix_ms - i64::from(deviation_min) * 60_000);
    b[9..11].copy_from_slice(&deviation_min.to_be_bytes());
    b
}

/// A 12-byte date-time for `unix_ms`, in UTC (deviation 0, status 0): what we send in range
/// descriptors.
pub fn encode_utc(unix_ms: i64) -> [u8; 12] {
    let secs = unix_ms.div_euclid(1000);
    let hundredths = (unix_ms.rem_euclid(1000) / 10) as u8;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    // 1970-01-01 was a Thursday; COSEM weekday 1 = Monday.
    let weekday = ((days.rem_euclid(7) + 3) % 7 + 1) as u8;
    let year = u16::try_from(y.clamp(0, 0xFFFE))
        .unwrap_or(0xFFFE)
        .to_be_bytes();
    [
        year[0],
        year[1],
        m as u8,
        d as u8,
        weekday,
        (rem / 3600) as u8,
        (rem % 3600 / 60) as u8,
        (rem % 60) as u8,
        hundredths,
        0x00,
        0x00,
        0x00,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants_round_trip() {
        // 2026-11-30 07:05:06.07 UTC, a Monday.
        let ms = 1_796_022_306_070;
        let b = encode_utc(ms);
        assert_eq!(b, [0x07, 0xEA, 11, 30, 1, 7, 5, 6, 7, 0, 0, 0]);
        assert_eq!(decode(&b).expect("valid").unix_ms, ms);
        assert_eq!(encode_utc(0), [0x07, 0xB2, 1, 1, 4, 0, 0, 0, 0, 0, 0, 0]);
        for ms in [0, 951_782_400_000, 4_102_444_799_990, 1_709_164_800_000] {
            assert_eq!(decode(&encode_utc(ms)).expect("valid").unix_ms, ms, "{ms}");
        }
    }

    #[test]
    fn deviation_and_status_are_honoured() {
        // 08:05 local CET (deviation -60: UTC = local - 60 min) is 07:05 UTC.
        let mut b = [0x07, 0xEA, 11, 30, 0xFF, 8, 5, 0, 0xFF, 0xFF, 0xC4, 0x00];
        let i = decode(&b).expect("valid");
        assert_eq!(
            i.unix_ms,
            decode(&encode_utc(1_796_022_300_000)).expect("utc").unix_ms
        );
        assert_eq!(i.deviation_min, -60);
        // Unspecified deviation: read as UTC.
        b[9] = 0x80;
        b[10] = 0x00;
        assert_eq!(decode(&b).expect("valid").deviation_min, 0);
        b[11] = STATUS_DOUBTFUL | STATUS_DAYLIGHT_SAVING;
        assert!(decode(&b).expect("doubtful is usable").doubtful());
        b[11] = STATUS_INVALID;
        assert_eq!(decode(&b), Err(Error::Invalid(STATUS_INVALID)));
        b[11] = 0xFF;
        assert_eq!(decode(&b).expect("status unspecified").status, 0);
    }

    #[test]
    fn encode_with_deviation_round_trips() {
        let ms = 1_796_022_306_070;
        let cet = encode(ms, -60);
        assert_eq!(cet[5], 8, "local hour in CET");
        assert_eq!(i16::from_be_bytes([cet[9], cet[10]]), -60);
        assert_eq!(decode(&cet).expect("valid").unix_ms, ms);
    }

    #[test]
    fn unspecified_or_bad_fields_are_errors() {
        let good = encode_utc(1_796_022_306_070);
        assert!(decode(&good[..11]).is_err());
        for (at, v, field) in [
            (0, 0xFF, "year"),
            (2, 13, "month"),
            (3, 31, "day"),
            (5, 24, "hour"),
            (6, 60, "minute"),
            (7, 60, "second"),
            (8, 100, "hundredths"),
        ] {
            let mut b = good;
            b[at] = v;
            if at == 0 {
                b[1] = 0xFF;
            }
            assert_eq!(decode(&b), Err(Error::Field(field)), "{field}");
        }
    }
}
