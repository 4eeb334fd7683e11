"""Components that depart from the paper. Recipes that use them are reported in rows of their own (the
results table's "extended" column), never in place of the faithful ones."""
