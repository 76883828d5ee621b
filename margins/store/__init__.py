"""The result store and its schema: chunks committed one file at a time with a journal (`chunks`), the merged
report written whole or not at all and read back (`results`), and the words naming what a folder holds (`names`)."""
