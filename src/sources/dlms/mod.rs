//! DLMS/COSEM meter polling (issue #3).
