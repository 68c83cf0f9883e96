//! The NBD front end (fixed newstyle, structured replies, block status).
