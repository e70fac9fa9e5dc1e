"""The offline model vizapp ships: its Fashion-MNIST data loader (``data``), training command (``train``) and the
report on what it learned (``report``). Tools of the bundled model only; the library never imports them."""
