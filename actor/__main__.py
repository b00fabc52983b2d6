from actor.cli import main

raise SystemExit(main())
