"""The test suite: one folder per package it tests (see README.md); shared helpers at this level (``tests.NAME``)."""
