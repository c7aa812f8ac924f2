"""Pure rules of the assignment service: records, state machine, scoring, phones, paging."""
