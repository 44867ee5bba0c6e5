"""One module per top-level `endostream` command: `add_parser(subparsers)` builds its parser, its `run*` functions
run it. Packages with heavy imports (training, export, service engines) are imported inside the runners only, so
building the parser stays cheap and never needs torch or training/ (the serving images ship without both)."""
