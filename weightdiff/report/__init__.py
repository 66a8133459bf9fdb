"""The run's report, in three replaceable parts: facts (numbers and verdicts derived from the stages' outputs),
the prose (paper.typ.j2, a Jinja template that turns facts into Typst) and the typesetter (Typst, source and
figures into PDF). Figures and paper read the same facts, so the two can never disagree.
"""
