"""The bundle format and everything the board needs to trust one: the format itself (read and
written here only), device enrolments, and public key files. Verification happens before parsing."""
