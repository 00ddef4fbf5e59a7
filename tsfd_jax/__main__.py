from tsfd_jax.main import main

if __name__ == "__main__":
    main()
