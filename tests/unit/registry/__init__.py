"""Registry unit tests: handlers and domain on fakes."""
