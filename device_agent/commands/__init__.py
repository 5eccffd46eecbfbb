"""Signed remote commands and trusted time: the formats (``format``), the pure decision whether
the board obeys one (``decide``), and nothing else; the agent carries out what is decided."""
