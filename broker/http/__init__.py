"""HTTP/1.1 serving, written once: the shell (h11 on trio) that the emulator and the
Merchant API proxy both stand on."""
