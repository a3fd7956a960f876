from promptmux.cli import entry

entry()
