"""What mutation testing (`make mutate`) found untested: each test fails with the mutant it names."""
