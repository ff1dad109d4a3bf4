"""In-context-learning testbed (study 4): synthetic bursty sequences, a small decoder, ICL/IWL metrics."""
