"""Part of Baton; installed as a subpackage of `baton`, never as a top-level package."""
