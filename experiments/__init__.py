"""Sweeps of training runs (`experiments.sweep`) and their report (`experiments.report`).

A sweep expands a grid of config overrides times seeds into one workdir per run, trains
and evaluates them with `main.py`, and collects their `eval.jsonl` rows; the report turns
those rows into curves, a table and the speed-up of each arm over vanilla.
"""
