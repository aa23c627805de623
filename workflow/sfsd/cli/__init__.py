"""The command line, `python -m sfsd <command>`: one command per stage, which every rule runs. The
commands live by stage: `stages.py` (model to compressed model), `evaluate.py` (scoring, the search,
inference cost), `report.py` (figures, tables, the LASER study); `options.py` holds what they share and
`main.py` the parser. `sfsd.provenance.command_modules` finds a command's code here.
"""
