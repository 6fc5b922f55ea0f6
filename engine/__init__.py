"""How a run goes: settings, training, evaluation, run records, inference and the report.

The scripts at the top of the repository only assemble what is here; everything here builds on
``models/`` (what is learned), ``datasets/`` (what is read) and ``utils/`` (leaf helpers), and
none of those imports anything of ``engine/``. README.md's code map lists the modules.
"""
