"""What a user runs, after the command line's parsing and config: train, plan, sample (scored side by side), export,
and the script that trains the toy world."""
