//! The simulated load profile 1.0.99.1.0.255 (Profile generic, class 7), served when
//! `--profile-rows N` is given: capture objects (clock, 2) and (active energy 1.0.1.8.0.255, 2),
//! N entries ending at the last whole capture period, the energy of an entry a function of its
//! time (so every connection and every meter sees the same buffer, and new entries appear as
//! time passes). The buffer is read whole, by range (selector 1, on the clock column) or by
//! entry (selector 2), as the same options of the Gurux meter in `../shared/meter-sim` serve it.
//!
//! Pure: the current time is a parameter.

use crate::dlms::apdu::{Data, DataAccessResult};
use crate::dlms::clock;

/// Logical name of the load profile.
pub const LN: [u8; 6] = [1, 0, 99, 1, 0, 255];
/// Class id of Profile generic.
pub const CLASS: u16 = 7;
/// Logical name of the clock (first captured column).
const CLOCK_LN: [u8; 6] = [0, 0, 1, 0, 0, 255];
/// Logical name of the active energy register (second captured column).
const ENERGY_LN: [u8; 6] = [1, 0, 1, 8, 0, 255];
/// Wh added per capture period in the energy column (a steady 1.1 kW at 15 min).
const WH_PER_PERIOD: u32 = 275;

/// One meter's load profile: how many entries it keeps and how far apart they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadProfile {
    /// Entries in the buffer (`entries_in_use` = `profile_entries`).
    pub rows: u32,
    /// Capture period in seconds (at least 1).
    pub period_s: u32,
}

impl LoadProfile {
    /// Unix seconds of the newest entry at `now_ms`: the last whole capture period.
    fn last_s(&self, now_ms: i64) -> i64 {
        let p = i64::from(self.period_s.max(1));
        now_ms.div_euclid(1000).div_euclid(p) * p
    }

    /// Unix seconds of entry `index` (1-based, oldest first).
    fn time_s(&self, index: u32, now_ms: i64) -> i64 {
        self.last_s(now_ms) - i64::from(self.rows - index) * i64::from(self.period_s.max(1))
    }

    /// One buffer row: the entry's time (UTC) and its energy register value.
    fn row(&self, t_s: i64) -> Data {
        let periods = t_s.div_euclid(i64::from(self.period_s.max(1)));
        let energy = (periods as u32).wrapping_mul(WH_PER_PERIOD);
        Data::Structure(vec![
            Data::OctetString(clock::encode_utc(t_s * 1000).to_vec()),
            Data::U32(energy),
        ])
    }

    /// Entries `first..=last` (1-based, clamped to the buffer).
    fn rows_between(&self, first: u32, last: u32, now_ms: i64) -> Data {
        let last = last.min(self.rows);
        let first = first.max(1);
        if first > last {
            return Data::Array(Vec::new());
        }
        Data::Array(
            (first..=last)
                .map(|i| self.row(self.time_s(i, now_ms)))
                .collect(),
        )
    }

    /// Attribute `attr` at `now_ms`, with the request's selective access (selector,
    /// parameters) if it had one.
    pub fn attribute(
        &self,
        attr: u8,
        selection: Option<&(u8, Data)>,
        now_ms: i64,
    ) -> Result<Data, DataAccessResult> {
        match (attr, selection) {
            (1, _) => Ok(Data::OctetString(LN.to_vec())),
            (2, None) => Ok(self.rows_between(1, self.rows, now_ms)),
            (2, Some((1, params))) => self.by_range(params, now_ms),
            (2, Some((2, params))) => self.by_entry(params, now_ms),
            (2, Some(_)) => Err(DataAccessResult::OtherReason),
            (3, _) => Ok(capture_objects()),
            (4, _) => Ok(Data::U32(self.period_s)),
            (5, _) => Ok(Data::Enum(1)), // sort_method: fifo
            (7 | 8, _) => Ok(Data::U32(self.rows)),
            _ => Err(DataAccessResult::ReadWriteDenied),
        }
    }

    /// Selector 1: `{restricting object, from, to, selected columns}` on the clock column.
    fn by_range(&self, params: &Data, now_ms: i64) -> Result<Data, DataAccessResult> {
        let Data::Structure(f) = params else {
            return Err(DataAccessResult::OtherReason);
        };
        let [restricting, from, to, _columns] = f.as_slice() else {
            return Err(DataAccessResult::OtherReason);
        };
        let on_clock = matches!(restricting, Data::Structure(r)
            if matches!(r.as_slice(), [class, Data::OctetString(ln), ..]
                if class.as_i64() == Some(8) && ln.as_slice() == CLOCK_LN));
        if !on_clock {
            return Err(DataAccessResult::OtherReason);
        }
        let instant = |d: &Data| match d {
            Data::OctetString(b) => clock::decode(b)
                .map(|i| i.unix_ms)
                .map_err(|_| DataAccessResult::OtherReason),
            Data::DateTime(b) => clock::decode(b)
                .map(|i| i.unix_ms)
                .map_err(|_| DataAccessResult::OtherReason),
            _ => Err(DataAccessResult::OtherReason),
        };
        let (from_ms, to_ms) = (instant(from)?, instant(to)?);
        let rows = (1..=self.rows)
            .map(|i| self.time_s(i, now_ms))
            .filter(|t| (from_ms..=to_ms).contains(&(t * 1000)))
            .map(|t| self.row(t))
            .collect();
        Ok(Data::Array(rows))
    }

    /// Selector 2: `{from_entry, to_entry (0 = the last), from_column, to_column}`.
    fn by_entry(&self, params: &Data, now_ms: i64) -> Result<Data, DataAccessResult> {
        let Data::Structure(f) = params else {
            return Err(DataAccessResult::OtherReason);
        };
        let entry = |d: &Data| {
            d.as_i64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or(DataAccessResult::OtherReason)
        };
        let (first, last) = match f.as_slice() {
            [from, to, ..] => (entry(from)?, entry(to)?),
            _ => return Err(DataAccessResult::OtherReason),
        };
        let last = if last == 0 { self.rows } else { last };
        Ok(self.rows_between(first, last, now_ms))
    }
}

/// `capture_objects`: the clock and the active energy register, whole attribute 2 each.
fn capture_objects() -> Data {
    let column = |class: u16, ln: [u8; 6]| {
        Data::Structure(vec![
            Data::U16(class),
            Data::OctetString(ln.to_vec()),
            Data::I8(2),
            Data::U16(0),
        ])
    };
    Data::Array(vec![column(8, CLOCK_LN), column(3, ENERGY_LN)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dlms::apdu::{self, AttrRef, CaptureObject};
    use crate::dlms::obis::ObisCode;

    /// 2026-11-30 10:07:30 UTC: 450 s past a quarter hour.
    const NOW_MS: i64 = 1_796_033_250_000;
    const DAY: LoadProfile = LoadProfile {
        rows: 96,
        period_s: 900,
    };

    fn times(d: &Data) -> Vec<i64> {
        let Data::Array(rows) = d else {
            panic!("not an array: {d:?}")
        };
        rows.iter()
            .map(|r| match r {
                Data::Structure(c) => match &c[0] {
                    Data::OctetString(b) => clock::decode(b).expect("clock").unix_ms,
                    other => panic!("clock column {other:?}"),
                },
                other => panic!("row {other:?}"),
            })
            .collect()
    }

    fn clock_column() -> CaptureObject {
        CaptureObject {
            attr: AttrRef::new(8, ObisCode::new(0, 0, 1, 0, 0, 255), 2),
            data_index: 0,
        }
    }

    #[test]
    fn whole_buffer_is_one_day_ending_at_the_last_quarter_hour() {
        let t = times(&DAY.attribute(2, None, NOW_MS).expect("buffer"));
        assert_eq!(t.len(), 96);
        let last = NOW_MS - 450_000;
        assert_eq!(t[95], last);
        assert_eq!(t[0], last - 95 * 900_000);
        assert!(t.windows(2).all(|w| w[1] - w[0] == 900_000));
    }

    #[test]
    fn capture_objects_parse_as_clock_and_energy() {
        let d = DAY.attribute(3, None, NOW_MS).expect("capture objects");
        let cols = apdu::parse_capture_objects(&d).expect("parse");
        assert_eq!(cols[0], clock_column());
        assert_eq!(
            cols[1].attr,
            AttrRef::new(3, ObisCode::new(1, 0, 1, 8, 0, 255), 2)
        );
        assert_eq!(DAY.attribute(4, None, NOW_MS), Ok(Data::U32(900)));
        assert_eq!(DAY.attribute(7, None, NOW_MS), Ok(Data::U32(96)));
        assert_eq!(
            DAY.attribute(6, None, NOW_MS),
            Err(DataAccessResult::ReadWriteDenied)
        );
    }

    #[test]
    fn range_access_returns_the_entries_in_the_window_inclusive() {
        let last = NOW_MS - 450_000;
        // The poller's request: from one second after the last stored entry to now.
        let sel = (
            1,
            apdu::range_descriptor(
                &clock_column(),
                clock::encode_utc(last - 3 * 900_000 + 1000),
                clock::encode_utc(NOW_MS),
            ),
        );
        let t = times(&DAY.attribute(2, Some(&sel), NOW_MS).expect("range"));
        assert_eq!(t, vec![last - 2 * 900_000, last - 900_000, last]);
        // Both ends inclusive.
        let sel = (
            1,
            apdu::range_descriptor(
                &clock_column(),
                clock::encode_utc(last - 900_000),
                clock::encode_utc(last),
            ),
        );
        assert_eq!(
            times(&DAY.attribute(2, Some(&sel), NOW_MS).expect("range")).len(),
            2
        );
    }

    #[test]
    fn entry_access_counts_from_the_oldest_and_zero_means_the_last() {
        let sel = (2, apdu::entry_descriptor(95, 0));
        let t = times(&DAY.attribute(2, Some(&sel), NOW_MS).expect("entries"));
        assert_eq!(t, vec![NOW_MS - 450_000 - 900_000, NOW_MS - 450_000]);
        let sel = (2, apdu::entry_descriptor(90, 1000));
        assert_eq!(
            times(&DAY.attribute(2, Some(&sel), NOW_MS).expect("clamped")).len(),
            7
        );
        let sel = (2, apdu::entry_descriptor(50, 10));
        assert_eq!(
            DAY.attribute(2, Some(&sel), NOW_MS),
            Ok(Data::Array(Vec::new()))
        );
    }

    #[test]
    fn energy_grows_with_time_and_bad_selections_are_refused() {
        let Ok(Data::Array(rows)) = DAY.attribute(2, None, NOW_MS) else {
            panic!("buffer")
        };
        let energy: Vec<u32> = rows
            .iter()
            .map(|r| match r {
                Data::Structure(c) => match c[1] {
                    Data::U32(v) => v,
                    ref other => panic!("energy column {other:?}"),
                },
                other => panic!("row {other:?}"),
            })
            .collect();
        assert!(energy
            .windows(2)
            .all(|w| w[1] == w[0].wrapping_add(WH_PER_PERIOD)));
        for sel in [
            (3, Data::Null),
            (1, Data::U8(1)),
            (2, Data::Structure(vec![])),
        ] {
            assert_eq!(
                DAY.attribute(2, Some(&sel), NOW_MS),
                Err(DataAccessResult::OtherReason),
                "{sel:?}"
            );
        }
        // Range restricted on a column other than the clock.
        let energy_col = CaptureObject {
            attr: AttrRef::new(3, ObisCode::new(1, 0, 1, 8, 0, 255), 2),
            data_index: 0,
        };
        let sel = (
            1,
            apdu::range_descriptor(&energy_col, clock::encode_utc(0), clock::encode_utc(NOW_MS)),
        );
        assert_eq!(
            DAY.attribute(2, Some(&sel), NOW_MS),
            Err(DataAccessResult::OtherReason)
        );
    }
}
