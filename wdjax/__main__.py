from wdjax.cli import main

main()
