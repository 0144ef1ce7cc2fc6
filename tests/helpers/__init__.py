"""Helpers the tests share (plain functions and constants, by subject); fixtures stay in
the conftest.py files, which pytest finds by themselves and which are not for importing."""
