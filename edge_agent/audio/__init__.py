"""Audio input at the edge: strict WAV decoding and band-limited resampling to 16 kHz mono."""
