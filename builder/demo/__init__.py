"""`make demo` (`python -m builder.demo`): the whole story on one machine (`story`), with its
broker, clients, display, processes, summary and free ports."""
