//! DLMS/COSEM meter polling (issue #3).

pub mod apdu;
pub mod obis;
pub mod hdlc;
pub mod link;
pub mod wrapper;
