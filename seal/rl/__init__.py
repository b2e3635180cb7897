"""The outer loop: teaching the teacher to write better self-edits (ReST^EM, SEAL §3.1)."""
